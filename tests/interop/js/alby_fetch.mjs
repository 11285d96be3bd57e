// Alby's fetchWithL402 (@getalby/lightning-tools) against the gateway, paying from bob's LND
// over its REST API. Run by tests/regtest/test_interop_clients.py:
//
//   BOB_REST=127.0.0.1:port BOB_TLS_CERT=... BOB_MACAROON=... node alby_fetch.mjs URL
//
// Prints one JSON object per line: the paid request, the same URL again with the credential
// the first response carries (must not pay), and that URL with a credential the gateway
// refuses (a 401). The client's own parsing is used unchanged; only the wallet is ours.
import { readFileSync } from "node:fs";
import { request } from "node:https";
import { fetchWithL402 } from "@getalby/lightning-tools/402/l402";

const [url] = process.argv.slice(2);
const rest = process.env.BOB_REST;
const ca = readFileSync(process.env.BOB_TLS_CERT);
const macaroon = readFileSync(process.env.BOB_MACAROON).toString("hex");

// POST to LND's REST proxy; resolves with the body (routerrpc streams JSON lines).
function post(path, body) {
  const [host, port] = rest.split(":");
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host,
        port: Number(port),
        path,
        method: "POST",
        ca,
        headers: { "Grpc-Metadata-macaroon": macaroon, "Content-Type": "application/json" },
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (chunk) => (text += chunk));
        res.on("end", () =>
          res.statusCode === 200 ? resolve(text) : reject(new Error(`LND ${res.statusCode}: ${text}`)),
        );
      },
    );
    req.on("error", reject);
    req.end(JSON.stringify(body));
  });
}

// The narrowest wallet the library accepts: payInvoice({invoice}) -> {preimage (hex)}.
const wallet = {
  async payInvoice({ invoice }) {
    const text = await post("/v2/router/send", {
      payment_request: invoice,
      timeout_seconds: 30,
      fee_limit_sat: 10,
    });
    const updates = text.trim().split("\n").map((line) => JSON.parse(line));
    const last = updates[updates.length - 1];
    const payment = last.result ?? {};
    if (payment.status !== "SUCCEEDED") {
      throw new Error(`payment ${payment.status ?? JSON.stringify(last)}`);
    }
    // routerrpc's Payment.payment_preimage is a hex string, not base64 bytes.
    return { preimage: payment.payment_preimage, fees_paid: Number(payment.fee_msat ?? 0) };
  },
};

async function report(step, response) {
  const body = await response.text();
  const payment = response.payment;
  console.log(
    JSON.stringify({
      step,
      status: response.status,
      paid: payment?.paid ?? null,
      amountSat: payment?.amountSat ?? null,
      scheme: payment?.credentials?.value.split(" ")[0] ?? null,
      wwwAuthenticate: response.headers.get("www-authenticate"),
      body,
    }),
  );
  return payment;
}

const first = await report("pay", await fetchWithL402(url, {}, { wallet }));
await report("reuse", await fetchWithL402(url, {}, { wallet, credentials: first.credentials }));
const [scheme, credential] = first.credentials.value.split(" ");
const wrong = `${credential.slice(0, credential.lastIndexOf(":"))}:${"00".repeat(32)}`;
await report(
  "refused",
  await fetchWithL402(url, {}, { wallet, credentials: { header: "Authorization", value: `${scheme} ${wrong}` } }),
);
