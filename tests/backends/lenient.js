// A deliberately lenient HTTP backend: it serves its premium content to a request that any
// of several popular stacks would route to /api/premium/ (Node's WHATWG URL parser reads '\'
// as '/', Express matches case-insensitively and ignores a trailing slash, Tomcat/Spring drop
// ';' path parameters, Rails and Spring route /a.json as /a, PHP front controllers route
// /index.php/a as /a, some stacks decode twice,
// Rails/Express/Laravel honour method overrides in headers, the query and a POST's body
// (PHP's names: cut at a NUL, leading spaces dropped, ' ', '.' and '[' read as '_'), Zend
// Framework 1 routes by X-Original-URL or X-Rewrite-URL).
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
    seen.add(path.replace(/\.[^/.]*$/, "") + "/"); // Rails' (.:format)
    seen.add(path.replace(/\.[^/]*$/, "") + "/"); // Spring's suffix patterns
    seen.add(path.replace(/^.*?\.php(?=\/)/i, "")); // a PHP front controller's PATH_INFO
    try {
      path = new URL(decodeURIComponent(path), "http://backend").pathname;
    } catch (error) {
      break;
    }
  }
  return [...seen];
}

function phpName(key) {
  return key.split("\0")[0].replace(/^ +/, "").replace(/[ .[]/g, "_").toLowerCase();
}

function namedMethod(params) {
  for (const [key, value] of params) {
    // PHP's names, and qs's arrays (_method[]=GET), of which method-override takes the first.
    const named = phpName(key) === "_method" || phpName(key.split("[")[0]) === "_method";
    if (named && value) return value;
  }
  return undefined;
}

function bodyMethod(req, body) {
  if (req.method !== "POST") return undefined;
  const type = String(req.headers["content-type"] || "").split(";")[0].trim().toLowerCase();
  if (type === "" || type === "application/x-www-form-urlencoded") {
    return namedMethod(new URLSearchParams(body.toString("latin1")));
  }
  if (type === "application/json" || type.endsWith("+json")) {
    try {
      const value = JSON.parse(body.toString("utf8"))._method;
      const named = Array.isArray(value) ? value[0] : value;
      return typeof named === "string" ? named : undefined;
    } catch (error) {
      return undefined;
    }
  }
  if (type === "multipart/form-data") {
    const fields = body.toString("latin1").matchAll(/name="([^"]*)"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]*)/gi);
    return namedMethod([...fields].map((field) => [field[1], field[2]]));
  }
  return undefined;
}

function effectiveMethod(req, url, body) {
  for (const name of ["x-http-method-override", "x-http-method", "x-method-override"]) {
    if (req.headers[name]) return String(req.headers[name]).toUpperCase();
  }
  const override = bodyMethod(req, body) || namedMethod(url.searchParams);
  return override ? override.toUpperCase() : req.method;
}

const server = http.createServer((req, res) => {
  const target = req.headers["x-original-url"] || req.headers["x-rewrite-url"] || req.url;
  const url = new URL(target, "http://backend");
  const paths = readings(target);
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const premium =
      effectiveMethod(req, url, body) === "GET" &&
      paths.some((p) => p.toLowerCase().replace(/;[^/]*/g, "").startsWith("/api/premium/"));
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
