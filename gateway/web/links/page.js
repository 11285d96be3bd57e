(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const root = $("link");
  const data = root.dataset;
  const singleUse = data.singleUse === "1";
  const fixed = data.fixed === "1";
  const minMsat = Number(data.minMsat);
  const maxMsat = Number(data.maxMsat);
  const status = $("status");
  const notice = $("notice");
  const qr = $("qr");
  const text = $("invoice");
  const copyButton = $("copy");

  let shown = data.hash; // payment hash of the invoice the QR code holds; "" for the LNURL
  let expiresAt = Number(data.expiresAt); // that invoice's expiry (unix seconds), 0: none
  let timer = 0;
  let failures = 0;
  let fetching = false; // an /invoice request is under way
  let retry = 0; // the timer asking again for the amount another payer's invoice held up
  let held = 0; // how many times in a row it was held up (each wait is longer, up to 1 min)

  const say = (line, kind) => {
    if (status.textContent !== line) status.textContent = line; // no repeats for screen readers
    status.dataset.kind = kind || "";
  };
  const note = (line, kind) => {
    notice.textContent = line;
    notice.dataset.kind = kind || "";
    notice.hidden = !line;
  };
  const sat = (msat) => (msat / 1000).toLocaleString("en-US", { maximumFractionDigits: 3 });
  const received = (n) => `Received ${n} payment${n === 1 ? "" : "s"}`;
  const DONE = JSON.parse(data.done); // state -> what the page says: "Paid", or why not
  const RETRY = 10000; // ms before asking again for an amount another payer's invoice holds up

  function show(invoice) {
    // The server's own SVG of the invoice's QR code; parsed inertly (no script runs), as
    // inline HTML SVG (it has no xmlns), and only its <svg> element is taken.
    const svg = new DOMParser().parseFromString(invoice.qr_svg, "text/html").querySelector("svg");
    if (!svg) return;
    qr.replaceChildren(document.importNode(svg, true));
    const uri = `lightning:${invoice.invoice}`;
    qr.href = uri;
    $("open-wallet").href = uri;
    text.textContent = invoice.invoice;
    $("invoice-label").textContent = "Lightning invoice";
    shown = invoice.payment_hash;
    expiresAt = invoice.expires_at;
    if (!fixed) $("amount").textContent = `${sat(invoice.amount_msat)} sat`; // the one chosen
    $("pay").hidden = false;
    clearTimeout(retry); // an invoice is shown: asking again would only replace it later
    note("");
  }

  function finish(state) {
    root.dataset.state = state;
    clearTimeout(timer);
    $("pay").hidden = true;
    $("chooser").hidden = true;
    note("");
    clearTimeout(retry);
    say(DONE[state] || state, state === "paid" ? "ok" : "error");
  }

  function apply(body) {
    if (body.state !== "open") return finish(body.state);
    if (!singleUse) {
      if (body.paid_count) say(received(body.paid_count), "ok");
      else say("Waiting for payment");
      return;
    }
    const invoice = body.invoice;
    if (invoice && invoice.payment_hash !== shown && invoice.qr_svg) {
      show(invoice); // another invoice replaced the one shown (say, an LNURL wallet's)
    } else if (fixed && expiresAt && Date.now() / 1000 >= expiresAt) {
      fetchInvoice(""); // the fixed amount's invoice expired: the page gets a fresh one
    }
    say("Waiting for payment");
  }

  async function poll() {
    clearTimeout(timer);
    if (root.dataset.state !== "open") return;
    let delay = 1000;
    try {
      const response = await fetch(`${data.statusUrl}?have=${encodeURIComponent(shown)}`, {
        headers: { Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        failures = 0;
        apply(body);
      } else {
        failures += 1;
        const wait = Number(response.headers.get("Retry-After")) * 1000;
        delay = Math.min(Math.max(wait || 0, 1000 * 2 ** failures), 15000);
        say(body.reason ? `Reconnecting\u2026 (${body.reason})` : "Reconnecting\u2026");
      }
    } catch (error) {
      failures += 1;
      delay = Math.min(1000 * 2 ** failures, 15000);
      say("Reconnecting\u2026");
    }
    if (root.dataset.state === "open") timer = setTimeout(poll, delay);
  }

  async function fetchInvoice(amount) {
    if (fetching || root.dataset.state !== "open") return;
    clearTimeout(retry);
    fetching = true;
    $("get-invoice").disabled = true;
    try {
      const query = amount ? `?amount=${amount}` : "";
      const response = await fetch(`${data.invoiceUrl}${query}`, {
        headers: { Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok && body.invoice) {
        held = 0;
        show(body);
      } else if (response.status === 409) {
        // Another payer's invoice holds this single-use link: it is paid or frees up soon.
        const reason = String(body.reason || "someone else is paying this link now");
        const line = reason.charAt(0).toUpperCase() + reason.slice(1).replace(/[.;,\s]+$/, "");
        note(`${line}. Asking again shortly\u2026`, "error");
        const wait = Number(response.headers.get("Retry-After")) * 1000;
        held += 1;
        // The server says when the open invoice frees up; without that, back off.
        retry = setTimeout(() => fetchInvoice(amount), wait ? wait + 500 : Math.min(RETRY * held, 60000));
      } else {
        note(body.reason || `Cannot get an invoice (${response.status}).`, "error");
      }
    } catch (error) {
      note("Cannot get an invoice: the connection failed.", "error");
    } finally {
      fetching = false;
      $("get-invoice").disabled = false;
    }
  }

  $("chooser").addEventListener("submit", (event) => {
    event.preventDefault();
    const sats = Number($("amount-field").value);
    const msat = Math.round(sats * 1000);
    if (!Number.isFinite(sats) || msat < minMsat || msat > maxMsat) {
      note(`Choose an amount from ${sat(minMsat)} to ${sat(maxMsat)} sat.`, "error");
      return;
    }
    held = 0;
    fetchInvoice(String(msat));
  });

  copyButton.addEventListener("click", () => copyText(copyButton, text.textContent, text));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });

  if (root.dataset.state === "open") timer = setTimeout(poll, 1000);
})();
