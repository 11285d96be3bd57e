(() => {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const root = $("paywall");
  const invoice = root.dataset.invoice;
  const macaroon = root.dataset.macaroon;
  const redeemUrl = root.dataset.redeem;
  const deadline = Date.now() + Number(root.dataset.expiresIn) * 1000;
  const target = location.href.split("#")[0];
  const status = $("status");
  const notice = $("notice");
  const weblnButton = $("pay-webln");
  const countdown = $("countdown");
  const copyButton = $("copy");
  // Off HTTPS (and off localhost) the browser drops the Secure cookie: the access paid for
  // would be lost, so the page asks before showing the invoice and hands over the credential.
  const secure = window.isSecureContext;

  let state = "waiting"; // waiting -> paid | expired | failed, never back
  let timer = 0;
  let inFlight = false;
  let again = false;
  let failures = 0;

  const say = (text, kind) => {
    if (status.textContent !== text) status.textContent = text; // no repeats for screen readers
    status.dataset.kind = kind || "";
  };
  const note = (text, kind) => {
    notice.textContent = text;
    notice.dataset.kind = kind || "";
    notice.hidden = !text;
  };
  const secondsLeft = () => Math.max(0, Math.ceil((deadline - Date.now()) / 1000));
  const clock = (s) => `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;

  function tick() {
    if (state !== "waiting") return;
    say(failures ? "Reconnecting\u2026" : "Waiting for payment\u2026");
    countdown.textContent = `Invoice expires in ${clock(secondsLeft())}`;
  }

  function finish(next) {
    if (state !== "waiting") return false;
    state = next;
    clearTimeout(timer);
    weblnButton.hidden = true;
    countdown.textContent = "";
    return true;
  }

  function unlock() {
    if (!finish("paid")) return;
    say("Paid \u00b7 opening\u2026", "ok");
    location.replace(target); // once: the cookie is set, the same URL now opens
  }

  function reveal(credential) {
    if (typeof credential !== "string" || !credential) {
      return fail("Paid, but this page cannot keep the access. Open it over HTTPS.");
    }
    if (!finish("paid")) return;
    say("Paid", "ok");
    root.classList.remove("insecure");
    root.classList.add("revealed");
    $("insecure").hidden = true;
    $("credential").textContent = credential;
    $("paid-credential").hidden = false;
    note("");
  }

  function expire(text) {
    if (!finish("expired")) return;
    root.classList.add("expired");
    say(text, "error");
    $("fresh").hidden = false;
  }

  function fail(text) {
    if (!finish("failed")) return;
    say(text, "error");
    $("fresh").hidden = false;
  }

  async function poll() {
    if (state !== "waiting") return;
    if (inFlight) {
      again = true;
      return;
    }
    clearTimeout(timer);
    inFlight = true;
    const last = Date.now() >= deadline;
    let delay = 1000;
    try {
      const response = await fetch(redeemUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(secure ? { macaroon } : { macaroon, credential: true }),
        credentials: "same-origin",
        cache: "no-store",
        redirect: "error",
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok) {
        failures = 0;
        if (body.state === "settled") return secure ? unlock() : reveal(body.credential);
        if (body.state === "expired") return expire("This invoice has expired.");
        if (body.state === "canceled") return expire("This invoice was canceled.");
        // Pay on success: the request failed, so the held payment was given back.
        if (body.state === "refunded") {
          return expire(`Refunded, nothing was charged: ${String(body.failure || "the request failed")}.`);
        }
      } else if (response.status === 429 || response.status >= 500) {
        failures += 1;
        const wait = Number(response.headers.get("Retry-After")) * 1000;
        delay = Math.min(Math.max(wait || 0, 1000 * 2 ** failures), 15000);
      } else {
        return fail(`Cannot check the payment: ${body.detail || response.status}.`);
      }
    } catch (error) {
      failures += 1;
      delay = Math.min(1000 * 2 ** failures, 15000);
    } finally {
      inFlight = false;
    }
    if (state !== "waiting") return;
    if (last) return expire("This invoice has expired.");
    tick();
    if (again) {
      again = false;
      delay = 0;
    }
    timer = setTimeout(poll, Math.min(delay, Math.max(0, deadline - Date.now()) + 250));
  }

  function offerWebln() {
    const webln = window.webln;
    // (an element with id "webln" would also show up as window.webln)
    if (state === "waiting" && webln && typeof webln.sendPayment === "function") {
      weblnButton.hidden = false;
    }
  }

  weblnButton.addEventListener("click", async () => {
    weblnButton.disabled = true;
    note("Confirm the payment in your wallet\u2026");
    try {
      await window.webln.enable();
      await window.webln.sendPayment(invoice);
      note("Payment sent.");
      poll();
    } catch (error) {
      note(`WebLN payment failed: ${(error && error.message) || error}`, "error");
      weblnButton.disabled = false;
    }
  });

  copyButton.addEventListener("click", () => copyText(copyButton, invoice, $("invoice")));
  $("copy-credential").addEventListener("click", (event) =>
    copyText(event.currentTarget, $("credential").textContent, $("credential")),
  );
  $("pay-anyway").addEventListener("click", () => {
    $("insecure").hidden = true;
    root.classList.remove("insecure");
    note("Not on HTTPS: once paid, this page shows your credential to copy.", "error");
  });
  $("fresh").addEventListener("click", () => location.replace(target));
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) poll();
  });

  if (!secure) {
    root.classList.add("insecure");
    $("insecure").hidden = false;
  }
  offerWebln();
  window.addEventListener("load", offerWebln);
  setTimeout(offerWebln, 1000);
  tick();
  setInterval(tick, 1000);
  timer = setTimeout(poll, 1000);
})();
