// The config form: max_samples presets and the template suggested by the chosen model.
document.addEventListener("click", (event) => {
  const preset = event.target.closest("[data-max-samples]");
  if (!preset) return;
  const input = document.getElementById("max_samples");
  input.value = preset.dataset.maxSamples;
  input.dispatchEvent(new Event("change", { bubbles: true }));
});

function showSuggestedTemplate() {
  const select = document.getElementById("model_id");
  const hint = document.getElementById("template-suggestion");
  if (!select || !hint || select.tagName !== "SELECT") return;
  const suggested = JSON.parse(select.dataset.suggested || "{}")[select.value];
  hint.textContent = suggested ? `Suggested for this model: ${suggested}` : "";
  const template = document.getElementById("template");
  if (suggested && template && !template.dataset.touched) template.value = suggested;
}
document.addEventListener("change", (event) => {
  if (event.target.id === "template") event.target.dataset.touched = "1";
  if (event.target.id === "model_id") showSuggestedTemplate();
});
document.addEventListener("DOMContentLoaded", () => {
  const template = document.getElementById("template");
  if (template && template.value) template.dataset.touched = "1"; // keep a saved or imported choice
  showSuggestedTemplate();
});
