// An Express 4 backend that honours method overrides the way method-override's README sets
// it up: the X-HTTP-Method-Override header, and `_method` in a body read by Express's own
// parsers (JSON, and forms parsed by qs). GET /api/premium/... is the priced content; it says
// which method it was routed as, so a test can tell whether a POST got past the gateway as a
// GET. Run with NODE_PATH at tests/interop/js/node_modules; prints its port.
"use strict";
const express = require("express");
const methodOverride = require("method-override");

const app = express();
app.use(express.json());
app.use(express.urlencoded({ extended: true }));
app.use(methodOverride("X-HTTP-Method-Override"));
app.use(
  methodOverride((req) => {
    const body = req.body;
    return body && typeof body === "object" && "_method" in body ? body._method : undefined;
  }),
);
app.get("/api/premium/*", (req, res) => res.json({ premium: true, method: req.method }));
app.all("*", (req, res) => res.json({ premium: false, method: req.method }));
app.use((error, req, res, next) => res.status(400).json({ premium: false, error: String(error) }));

const server = app.listen(0, "127.0.0.1", () => {
  process.stdout.write(`${server.address().port}\n`);
});
