// The config form: max_samples presets, the template suggested by the chosen model, Enter that
// does not save, and refused fields marked as the form changes.
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

// Enter in a one-line field would submit the whole form (saving a half-filled config): only the
// Save button saves. Enter still works in the Advanced box (a new line) and on buttons.
document.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || !event.target.closest?.("#config-form")) return;
  if (event.target.matches("input:not([type=checkbox]):not([type=radio]):not([type=submit]):not([type=button]), select")) {
    event.preventDefault();
  }
});

// Red border and aria-invalid on every field something refuses: the panel's checks (the estimates
// fragment's data-invalid) and LLaMA-Factory's (a non-empty lf-error-NAME under the field).
function markInvalidFields() {
  const form = document.getElementById("config-form");
  const estimates = document.getElementById("estimates");
  if (!form || !estimates) return;
  const invalid = new Set(JSON.parse(estimates.dataset.invalid || "[]"));
  form.querySelectorAll(".field-error[id^='lf-error-']").forEach((el) => {
    if (el.textContent.trim()) invalid.add(el.id.slice("lf-error-".length));
  });
  form.querySelectorAll("input[name], select[name], textarea[name]").forEach((field) => {
    const name = field.name;
    if (invalid.has(name)) {
      field.setAttribute("aria-invalid", "true");
      const message = document.getElementById(`error-${name}`) || document.getElementById(`lf-error-${name}`);
      if (message) field.setAttribute("aria-describedby", message.id);
    } else if (field.getAttribute("aria-invalid")) {
      field.removeAttribute("aria-invalid");
    }
  });
}
document.addEventListener("htmx:afterSettle", (event) => {
  markInvalidFields();
  // After "Validate", the cursor goes to the first field LLaMA-Factory refused.
  if (event.detail.requestConfig?.elt?.id === "validate-config" && event.detail.target?.id === "findings") {
    const first = document.querySelector("#config-form [aria-invalid='true']");
    first?.closest("details")?.setAttribute("open", "");
    first?.focus();
  }
});

// The chosen stage and fine-tuning type decide which fields, notes and datasets apply: the others
// are hidden (the panel drops a hidden field's value on save) and an unfit dataset says so.
function applies(el, stage, type) {
  const stages = (el.dataset.stages || "").split(",").filter(Boolean);
  const types = (el.dataset.types || "").split(",").filter(Boolean);
  return (!stages.length || stages.includes(stage)) && (!types.length || types.includes(type));
}
function followStageAndType() {
  const stage = document.getElementById("stage")?.value || "sft";
  const type = document.getElementById("finetuning_type")?.value || "lora";
  document.querySelectorAll("#config-form .param-field, #config-form .stage-note").forEach((el) => {
    el.hidden = !applies(el, stage, type);
  });
  const list = document.getElementById("dataset_ids");
  const kinds = JSON.parse(list?.dataset.stageKinds || "{}")[stage] || [];
  list?.querySelectorAll(".dataset-choice").forEach((choice) => {
    choice.querySelector(".dataset-misfit").hidden = kinds.includes(choice.dataset.kind);
  });
  const gpus = document.getElementById("gpus");
  const note = document.getElementById("qlora-cpu-note");
  if (note && gpus) note.hidden = Number(gpus.value) !== 0;
}
document.addEventListener("change", (event) => {
  if (["stage", "finetuning_type", "gpus"].includes(event.target.id)) followStageAndType();
});
document.addEventListener("DOMContentLoaded", followStageAndType);
