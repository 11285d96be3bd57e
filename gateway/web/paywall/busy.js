(() => {
  "use strict";
  // The gateway said when to come back (Retry-After): the button waits that long, then
  // reloads the page once when pressed; nothing reloads by itself.
  const root = document.getElementById("busy");
  const button = document.getElementById("retry");
  const status = document.getElementById("retry-status");
  const ready = Date.now() + Number(root.dataset.retryAfter || 0) * 1000;

  function tick() {
    const left = Math.ceil((ready - Date.now()) / 1000);
    if (left > 0) {
      button.disabled = true;
      status.textContent = `You can try again in ${left} s`;
      setTimeout(tick, 250);
    } else {
      button.disabled = false;
      status.textContent = "";
    }
  }

  button.addEventListener("click", () => location.reload());
  tick();
})();
