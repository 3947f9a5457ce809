"""The page `dgm-scale serve` shows at `/`: one self-contained HTML file (inline CSS and script,
no external assets: it works offline). It reads /api/meta to build its controls, initialises
them (one per sampling option the model's family offers: a menu, a number box or a slider) from
its own query string (`/?seed=3&num=25&class=2&truncation=0.7`, `/?sampler=ddim&steps=50`, also how
a view is shared), and loads the images with fetch() so that an API error is shown as its one-line text."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dgm-scale serve</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fafafa; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  #about { color: #666; margin-bottom: 12px; }
  fieldset { border: 1px solid #ccc; margin: 0 0 12px; padding: 8px 12px; }
  label { margin-right: 14px; white-space: nowrap; }
  input[type=number] { width: 7em; }
  img { image-rendering: pixelated; background: #000; display: block; margin-top: 8px; }
  .error { color: #b00020; font-weight: bold; min-height: 1.4em; }
  .hidden { display: none; }
</style>
</head>
<body>
<h1>dgm-scale serve</h1>
<div id="about">loading the model's description...</div>
<fieldset>
  <legend>samples</legend>
  <label>seed <input id="seed" type="number" min="0" value="0"></label>
  <button id="random" type="button">random</button>
  <label>samples <input id="num" type="number" min="1" value="16"></label>
  <label id="class-label" class="hidden">class <select id="class"></select></label>
  <span id="options"></span>
  <a id="npz" href="#">download as .npz</a>
  <div id="grid-error" class="error"></div>
  <img id="grid" alt="sample grid">
</fieldset>
<fieldset id="interpolation">
  <legend>latent interpolation</legend>
  <label>seed A <input id="seed_a" type="number" min="0" value="0"></label>
  <label>seed B <input id="seed_b" type="number" min="0" value="1"></label>
  <label>steps <input id="steps" type="number" min="2" value="8"></label>
  <div id="strip-error" class="error"></div>
  <img id="strip" alt="interpolation strip">
</fieldset>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const initial = new URLSearchParams(location.search);
let meta = null;
const serials = {}, optionInputs = {};  // the family's sampling controls: name -> its input

function showImage(img, errorBox, url) {
  const serial = (serials[img.id] || 0) + 1;
  serials[img.id] = serial;
  fetch(url).then(async (response) => {
    if (serials[img.id] !== serial) return;  // a newer request replaced this one
    if (!response.ok) throw new Error((await response.text()).trim() || response.statusText);
    const blob = await response.blob();
    if (serials[img.id] !== serial) return;
    img.onload = () => {
      const scale = Math.max(1, Math.floor(512 / img.naturalWidth));
      img.style.width = (img.naturalWidth * scale) + "px";
      URL.revokeObjectURL(img.src);
    };
    img.src = URL.createObjectURL(blob);
    errorBox.textContent = "";
  }).catch((error) => { errorBox.textContent = "error: " + error.message; });
}

function params(names) {
  const query = new URLSearchParams();
  for (const name of names) query.set(name, $(name).value);
  if ($("class").value !== "") query.set("class", $("class").value);
  for (const [name, input] of Object.entries(optionInputs)) query.set(name, input.value);
  return query.toString();
}

function updateGrid() {
  const query = params(["seed", "num"]);
  showImage($("grid"), $("grid-error"), "api/grid.png?" + query);
  $("npz").href = "api/batch?format=npz&" + query;
}

function updateStrip() {
  if (meta.latent_dim === null) return;
  showImage($("strip"), $("strip-error"), "api/interpolate.png?" + params(["seed_a", "seed_b", "steps"]));
}

// One control per sampling option the model's family offers (see GenerativeModule.sampling_controls):
// a choice is a menu, an integer a number box, a number a slider; the page's query string sets it.
function addOption(name, spec) {
  const form = spec.type || "number", label = document.createElement("label");
  let input;
  if (form === "choice") {
    input = document.createElement("select");
    for (const choice of spec.choices) input.add(new Option(choice, choice));
  } else {
    input = document.createElement("input");
    input.type = form === "integer" ? "number" : "range";
    input.min = spec.min !== undefined ? spec.min : 0.05;
    input.max = spec.max;
    input.step = form === "integer" ? 1 : 0.05;
  }
  input.id = "option-" + name;
  input.value = initial.has(name) ? initial.get(name) : spec.default;
  label.append(name + " ", input);
  if (form === "number") {
    const shown = document.createElement("span");
    shown.textContent = input.value;
    input.addEventListener("input", () => { shown.textContent = input.value; });
    label.append(" ", shown);
  }
  input.addEventListener("change", () => { updateGrid(); updateStrip(); });
  $("options").append(label);
  optionInputs[name] = input;
}

function setUp(description) {
  meta = description;
  $("about").textContent = meta.name + ": " + meta.family + " (" + meta.sample_shape.join("x") +
    (meta.num_classes ? ", " + meta.num_classes + " classes" : "") + ", iteration " + meta.iteration + ")";
  $("num").max = meta.caps.num; $("seed").max = meta.caps.seed; $("steps").max = meta.caps.steps;
  if (meta.num_classes > 0) {
    const select = $("class");
    select.add(new Option("every class in turn", ""));
    for (let k = 0; k < meta.num_classes; k++) select.add(new Option(String(k), String(k)));
    $("class-label").classList.remove("hidden");
  }
  for (const [name, spec] of Object.entries(meta.options)) addOption(name, spec);
  for (const name of ["seed", "num", "class", "seed_a", "seed_b", "steps"]) {
    if (initial.has(name)) $(name).value = initial.get(name);
  }
  if (meta.latent_dim === null) {
    $("strip-error").textContent = "interpolation needs a latent space; this " + meta.family + " model has none";
    $("strip").classList.add("hidden");
  }
  for (const name of ["seed", "num", "class"]) $(name).addEventListener("change", () => {
    updateGrid(); updateStrip();
  });
  for (const name of ["seed_a", "seed_b", "steps"]) $(name).addEventListener("change", updateStrip);
  $("random").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * meta.caps.seed);
    updateGrid();
  });
  updateGrid(); updateStrip();
}

fetch("api/meta").then((response) => response.ok ? response.json() : response.text().then((t) => {
  throw new Error(t.trim());
})).then(setUp).catch((error) => { $("about").textContent = "error: " + error.message; });
</script>
</body>
</html>
"""
