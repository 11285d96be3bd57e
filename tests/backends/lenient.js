// A deliberately lenient HTTP backend: it serves its premium content to a request that any
// of several popular stacks would route to /api/premium/ (Node's WHATWG URL parser reads '\'
// as '/', Express matches case-insensitively and ignores a trailing slash, Tomcat/Spring drop
// ';' path parameters, some stacks decode twice, Rails/Express honour method overrides).
// It echoes what it saw (the body as its length and SHA-256), so a test can tell whether the
// gateway let such a request past, and whether a body arrived whole.
"use strict";
const crypto = require("crypto");
const http = require("http");

function readings(target) {
  const url = new URL(target, "http://backend");
  const seen = new Set();
  let path = url.pathname;
  for (let round = 0; round < 3; round++) {
    seen.add(path);
    seen.add(path.toLowerCase());
    seen.add(path.replace(/;[^/]*/g, ""));
    seen.add(path.replace(/\/+$/, "") + "/");
    try {
      path = new URL(decodeURIComponent(path), "http://backend").pathname;
    } catch (error) {
      break;
    }
  }
  return [...seen];
}

function effectiveMethod(req, url) {
  for (const name of ["x-http-method-override", "x-http-method", "x-method-override"]) {
    if (req.headers[name]) return String(req.headers[name]).toUpperCase();
  }
  const override = url.searchParams.get("_method");
  return override ? override.toUpperCase() : req.method;
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, "http://backend");
  const paths = readings(req.url);
  const premium =
    effectiveMethod(req, url) === "GET" &&
    paths.some((p) => p.toLowerCase().replace(/;[^/]*/g, "").startsWith("/api/premium/"));
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(
      JSON.stringify({
        premium,
        target: req.url,
        paths,
        headers: req.headers,
        method: req.method,
        bodyLength: body.length,
        bodySha256: crypto.createHash("sha256").update(body).digest("hex"),
      }),
    );
  });
});
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(`${server.address().port}\n`);
});
