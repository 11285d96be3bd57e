// Shared by the gateway's pages, before each page's own script (in the same nonce'd element).
// copyText(button, text, element): put text on the clipboard; where the clipboard API is
// refused (no secure context, no permission), select the element's text and ask the browser
// to copy it. The button says what happened for two seconds.
const copyText = async (button, text, element) => {
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch (error) {
    const range = document.createRange();
    range.selectNodeContents(element);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try {
      copied = document.execCommand("copy");
    } catch (ignored) {
      copied = false;
    }
  }
  button.textContent = copied ? "Copied" : "Selected";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 2000);
};
