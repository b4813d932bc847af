"use strict";
// The explanation viewer: draws on a canvas (or takes a picture), posts it to
// /v2/models/{model}/explain with the chosen method, and shows the top classes, the server's
// warnings about the picture, the overlay (named by its method) and the feature maps.
const canvas = document.getElementById("canvas");
const ctx = canvas.getContext("2d");
const modelSelect = document.getElementById("model");
const methodSelect = document.getElementById("method");
const stepsLabel = document.getElementById("steps-label");
const stepsInput = document.getElementById("ig-steps");
let offered = {}; // model -> the methods its explainer offers (from /ui/models)
let titles = {}; // method -> its name as people write it
const statusLine = document.getElementById("status");
let picture = null; // bytes of a chosen file; null: the canvas is the picture

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  picture = null;
}

function headers(extra) {
  const token = document.getElementById("token").value.trim();
  return Object.assign(token ? { Authorization: "Bearer " + token } : {}, extra || {});
}

async function loadModels() {
  const response = await fetch("/ui/models", { headers: headers() });
  const body = await response.json();
  if (!response.ok) { statusLine.textContent = body.error; return; }
  offered = body.methods || {};
  titles = body.titles || {};
  modelSelect.innerHTML = "";
  for (const name of body.models) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    modelSelect.appendChild(option);
  }
  showMethods();
  if (!body.models.length) statusLine.textContent = "No model with an explainer is ready.";
}

function methodTitle(method) {
  return titles[method] || method;
}

function showMethods() {
  const chosen = methodSelect.value;
  const methods = offered[modelSelect.value] || ["gradcam"];
  methodSelect.innerHTML = "";
  for (const method of methods) {
    const option = document.createElement("option");
    option.value = method;
    option.textContent = methodTitle(method);
    methodSelect.appendChild(option);
  }
  if (methods.includes(chosen)) methodSelect.value = chosen;
  showSteps();
}

function showSteps() {
  stepsLabel.hidden = methodSelect.value !== "integrated_gradients";
}
modelSelect.addEventListener("change", showMethods);
methodSelect.addEventListener("change", showSteps);

let drawing = false;
function point(event) {
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}
canvas.addEventListener("pointerdown", (event) => {
  if (picture) clearCanvas();
  drawing = true;
  ctx.beginPath();
  ctx.moveTo(...point(event));
});
canvas.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 22;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.lineTo(...point(event));
  ctx.stroke();
});
for (const name of ["pointerup", "pointerleave"]) canvas.addEventListener(name, () => { drawing = false; });

async function showPicture(file) {
  picture = new Uint8Array(await file.arrayBuffer());
  const image = new Image();
  image.onload = () => {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
    URL.revokeObjectURL(image.src);
  };
  image.src = URL.createObjectURL(file);
}
document.getElementById("file").addEventListener("change", (event) => {
  if (event.target.files.length) showPicture(event.target.files[0]);
});
canvas.addEventListener("dragover", (event) => { event.preventDefault(); canvas.classList.add("dropping"); });
canvas.addEventListener("dragleave", () => canvas.classList.remove("dropping"));
canvas.addEventListener("drop", (event) => {
  event.preventDefault();
  canvas.classList.remove("dropping");
  if (event.dataTransfer.files.length) showPicture(event.dataTransfer.files[0]);
});
document.getElementById("clear").addEventListener("click", clearCanvas);

function canvasPng() {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

async function explain() {
  const model = modelSelect.value;
  if (!model) return;
  statusLine.textContent = "Explaining…";
  const body = picture || await canvasPng();
  const query = new URLSearchParams({ top_k: "3", feature_maps: "true" });
  if (methodSelect.value) query.set("method", methodSelect.value);
  if (!stepsLabel.hidden && stepsInput.value) query.set("ig_steps", stepsInput.value);
  const url = "/v2/models/" + encodeURIComponent(model) + "/explain?" + query;
  const response = await fetch(url, {
    method: "POST", body, headers: headers({ "Content-Type": "application/octet-stream" }),
  });
  const answer = await response.json();
  const warnings = document.getElementById("warnings");
  warnings.innerHTML = "";
  if (!response.ok) { statusLine.textContent = "Error: " + answer.error; return; }
  for (const text of answer.warnings || []) {
    const item = document.createElement("li");
    item.className = "warning";
    item.textContent = text;
    warnings.appendChild(item);
  }
  if (answer.inverted) {
    const item = document.createElement("li");
    item.className = "warning";
    item.textContent = "inverted: a dark picture on light paper, as the model reads light on dark";
    warnings.appendChild(item);
  }
  const list = document.getElementById("predictions");
  list.innerHTML = "";
  for (const p of answer.predictions) {
    const item = document.createElement("li");
    item.className = "prediction";
    item.dataset.classIndex = p.class_index;
    item.textContent = p.label + " " + (100 * p.probability).toFixed(1) + "%";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(150 * p.probability) + "px";
    item.appendChild(bar);
    list.appendChild(item);
  }
  const top = answer.predictions[0];
  statusLine.textContent = "Prediction: " + top.label;
  statusLine.dataset.classIndex = top.class_index;
  if (answer.explanations.length) {
    document.getElementById("overlay").src = "data:image/png;base64," + answer.explanations[0].overlay_png;
    const named = document.getElementById("method-name");
    named.dataset.method = answer.method;
    named.textContent = methodTitle(answer.method) + (answer.ig_steps ? " (" + answer.ig_steps + " steps)" : "");
  }
  if (answer.feature_maps_png) {
    document.getElementById("features").src = "data:image/png;base64," + answer.feature_maps_png;
  }
}
document.getElementById("explain").addEventListener("click", () => {
  explain().catch((error) => { statusLine.textContent = "Error: " + error; });
});

clearCanvas();
loadModels().catch((error) => { statusLine.textContent = "Error: " + error; });
