// The m2det web page: send an image to POST detect, draw the answer's boxes over it.
// Every box is one element in #boxes with its detection in data attributes (data-index, data-score,
// data-label, data-name, data-box: x1,y1,x2,y2 in image pixels), placed in displayed pixels; the
// score slider only hides and shows them. #boxes[data-state] is empty, waiting, drawn or error.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const el = {
    modelName: $("model-name"), apiKey: $("api-key"), drop: $("drop"), file: $("file"),
    cameraOpen: $("camera-open"), camera: $("camera"), video: $("camera-video"),
    snap: $("camera-snap"), cameraClose: $("camera-close"), stage: $("stage"), photo: $("photo"),
    boxes: $("boxes"), error: $("error"), status: $("status"), slider: $("min-score"),
    sliderValue: $("min-score-value"), shown: $("shown"), timing: $("timing"),
    classes: $("classes"), raw: $("raw"),
  };

  // distinct colours for the first classes (labels are 1-based), then hues a golden angle apart
  const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4",
                   "#42d4f4", "#f032e6", "#9bc53d", "#fabed4", "#469990"];
  function colour(label) {
    const i = Math.max(0, Number(label) - 1);
    return i < PALETTE.length ? PALETTE[i] : `hsl(${Math.round((i * 137.508) % 360)}, 75%, 50%)`;
  }

  let model = null;       // GET model's answer, or null while unknown
  let answer = null;      // the last POST detect answer
  let request = 0;        // the newest request's number: older answers are dropped
  let imageUrl = null;    // the object URL shown in #photo
  let stream = null;      // the camera's MediaStream while it is open

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = el.apiKey.value.trim();
    if (key) h["X-API-Key"] = key;
    return h;
  }

  // "HTTP 415 Unsupported Media Type: request body: not an image" from a FastAPI error answer
  async function describeError(response) {
    let detail = "";
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      const d = body && body.detail !== undefined ? body.detail : body;
      if (typeof d === "string") detail = d;
      else if (Array.isArray(d)) {
        detail = d.map((e) => (e && e.msg ? `${(e.loc || []).join(".")}: ${e.msg}` : JSON.stringify(e))).join("; ");
      } else detail = JSON.stringify(d);
    } catch (_) {
      detail = text.trim().slice(0, 500);
    }
    let message = `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
    if (detail) message += `: ${detail}`;
    if (response.status === 401 || response.status === 403) {
      message += el.apiKey.value.trim() ? " (check the API key)" : " (this service wants an API key: type it at the top)";
    }
    return message;
  }

  function showError(message) {
    el.error.textContent = message;
    el.error.hidden = !message;
  }

  async function loadModel() {
    try {
      const response = await fetch("model", { headers: headers() });
      if (!response.ok) throw new Error(await describeError(response));
      model = await response.json();
      const size = Array.isArray(model.input_size) ? model.input_size.join("×") : model.input_size;
      el.modelName.textContent = [model.name, size ? `${size} px` : "", model.device].filter(Boolean).join(" · ");
      el.modelName.classList.remove("bad");
      if (el.error.dataset.from === "model") showError("");
    } catch (err) {
      model = null;
      el.modelName.textContent = "model unknown";
      el.modelName.classList.add("bad");
      showError(`Could not read the model: ${err.message}`);
      el.error.dataset.from = "model";
    }
    renderClasses();
  }

  function minScore() {
    return Number(el.slider.value);
  }

  function renderClasses() {
    const names = (model && Array.isArray(model.class_names)) ? model.class_names : [];
    const counts = new Map();
    if (answer) {
      for (const d of answer.detections) {
        if (d.score >= minScore()) counts.set(d.label, (counts.get(d.label) || 0) + 1);
      }
    }
    el.classes.replaceChildren();
    names.forEach((name, i) => {
      const label = i + 1;
      const item = document.createElement("li");
      item.dataset.label = String(label);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour(label);
      const text = document.createElement("span");
      text.className = "name";
      text.textContent = name;
      const count = document.createElement("span");
      count.className = "count";
      count.textContent = answer ? String(counts.get(label) || 0) : "";
      item.append(swatch, text, count);
      if (answer && !counts.get(label)) item.classList.add("none");
      el.classes.append(item);
    });
    if (!names.length) {
      const item = document.createElement("li");
      item.className = "muted";
      item.textContent = "unknown until the model is read";
      el.classes.append(item);
    }
  }

  function renderTiming(roundTripMs) {
    const rows = [];
    const ms = (v) => `${Number(v).toFixed(1)} ms`;
    if (answer) {
      // the service's split of its time, then its total (upload excluded), then any timing it adds
      const known = [["decode_ms", "Decode"], ["queue_ms", "Queue"], ["inference_ms", "Inference"], ["time_ms", "In the service"]];
      for (const [key, label] of known) {
        if (typeof answer[key] === "number") rows.push([label, ms(answer[key]), key]);
      }
      for (const [key, value] of Object.entries(answer)) {
        if (key.endsWith("_ms") && typeof value === "number" && !known.some(([k]) => k === key)) {
          rows.push([key, ms(value), key]);
        }
      }
    }
    if (roundTripMs !== undefined) rows.push(["Round trip", ms(roundTripMs), "round_trip"]);
    el.timing.replaceChildren();
    if (!rows.length) {
      const dd = document.createElement("dd");
      dd.className = "muted";
      dd.textContent = "no answer";
      el.timing.append(document.createElement("dt"), dd);
    }
    for (const [name, value, key] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = name;
      const dd = document.createElement("dd");
      dd.textContent = value;
      dd.dataset.key = key;
      el.timing.append(dt, dd);
    }
  }

  // places the boxes for the displayed size of #photo; called again when that size changes
  function layoutBoxes() {
    if (!answer || !el.photo.naturalWidth) return;
    const sx = el.photo.clientWidth / answer.width;
    const sy = el.photo.clientHeight / answer.height;
    for (const box of el.boxes.children) {
      const [x1, y1, x2, y2] = box.dataset.box.split(",").map(Number);
      box.style.left = `${x1 * sx}px`;
      box.style.top = `${y1 * sy}px`;
      box.style.width = `${Math.max(0, x2 - x1) * sx}px`;
      box.style.height = `${Math.max(0, y2 - y1) * sy}px`;
      // the tag goes above the box when there is room, inside it at the image's top edge
      box.classList.toggle("tag-inside", y1 * sy < 18);
    }
  }

  function drawBoxes() {
    el.boxes.replaceChildren();
    answer.detections.forEach((d, i) => {
      const box = document.createElement("div");
      box.className = "box";
      box.dataset.index = String(i);
      box.dataset.score = String(d.score);
      box.dataset.label = String(d.label);
      box.dataset.name = d.name;
      box.dataset.box = d.box.join(",");
      box.style.setProperty("--c", colour(d.label));
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = `${d.name} ${Number(d.score).toFixed(2)}`;
      box.title = `${d.name}  score ${d.score}  box ${d.box.join(", ")}`;
      box.append(tag);
      el.boxes.append(box);
    });
    layoutBoxes();
    applyScore();
    el.boxes.dataset.state = "drawn";
  }

  // the slider filters what is drawn; no new request
  function applyScore() {
    const min = minScore();
    el.sliderValue.textContent = min.toFixed(2);
    if (!answer) return;
    let shown = 0;
    for (const box of el.boxes.children) {
      const visible = Number(box.dataset.score) >= min;
      box.hidden = !visible;
      if (visible) shown += 1;
    }
    const total = answer.detections.length;
    el.shown.textContent = `${shown} of ${total} detection${total === 1 ? "" : "s"} shown`;
    renderClasses();
  }

  function loaded(img) {
    return new Promise((resolve) => {
      if (img.complete && img.naturalWidth) resolve(true);
      else {
        img.addEventListener("load", () => resolve(true), { once: true });
        img.addEventListener("error", () => resolve(false), { once: true });
      }
    });
  }

  async function detect(blob, name) {
    const mine = ++request;
    showError("");
    answer = null;
    el.boxes.replaceChildren();
    el.boxes.dataset.state = "waiting";
    el.drop.classList.add("has-image");
    if (imageUrl) URL.revokeObjectURL(imageUrl);
    imageUrl = URL.createObjectURL(blob);
    el.photo.src = imageUrl;
    el.status.textContent = `Detecting in ${name}…`;
    el.drop.classList.add("busy");
    const start = performance.now();
    try {
      const response = await fetch("detect", {
        method: "POST",
        body: blob,
        headers: headers({ "Content-Type": blob.type || "application/octet-stream" }),
      });
      if (mine !== request) return;
      if (!response.ok) throw new Error(await describeError(response));
      const body = await response.json();
      const roundTrip = performance.now() - start;
      if (mine !== request) return;
      if (!body || !Array.isArray(body.detections)) throw new Error("the answer holds no detections list");
      const shown = await loaded(el.photo);
      if (mine !== request) return;
      answer = body;
      el.raw.textContent = JSON.stringify(body, null, 2);
      renderTiming(roundTrip);
      drawBoxes();
      const n = body.detections.length;
      el.status.textContent = `${name}: ${body.width}×${body.height} px, ${n} detection${n === 1 ? "" : "s"}.` +
        (shown ? "" : " This browser cannot show the image itself.");
    } catch (err) {
      if (mine !== request) return;
      const message = err instanceof TypeError ? `The service could not be reached (${err.message}).` : err.message;
      showError(`Detection failed: ${message}`);
      el.error.dataset.from = "detect";
      el.boxes.dataset.state = "error";
      el.status.textContent = `No detections for ${name}.`;
      renderTiming();
      renderClasses();
    } finally {
      if (mine === request) el.drop.classList.remove("busy");
    }
  }

  function takeFile(file) {
    if (file) detect(file, file.name || "the image");
  }

  // choosing, dropping and pasting
  el.file.addEventListener("change", () => {
    takeFile(el.file.files[0]);
    el.file.value = "";  // the same file again is a new request
  });
  el.drop.addEventListener("dragover", (e) => { e.preventDefault(); el.drop.classList.add("over"); });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    el.drop.classList.remove("over");
    takeFile(e.dataTransfer && e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) takeFile(item.getAsFile());
  });

  // the camera, offered only where the browser has one to give (a secure page: https or localhost)
  function stopCamera() {
    if (stream) stream.getTracks().forEach((t) => t.stop());
    stream = null;
    el.video.srcObject = null;
    el.camera.hidden = true;
    el.drop.classList.remove("camera-on");
  }
  if (navigator.mediaDevices && typeof navigator.mediaDevices.getUserMedia === "function") {
    el.cameraOpen.hidden = false;
    el.cameraOpen.addEventListener("click", async () => {
      showError("");
      try {
        stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
        el.video.srcObject = stream;
        el.camera.hidden = false;
        el.drop.classList.add("camera-on");
      } catch (err) {
        stopCamera();
        showError(`The camera is not available: ${err.message || err.name}`);
      }
    });
    el.cameraClose.addEventListener("click", stopCamera);
    el.snap.addEventListener("click", () => {
      const canvas = document.createElement("canvas");
      canvas.width = el.video.videoWidth;
      canvas.height = el.video.videoHeight;
      canvas.getContext("2d").drawImage(el.video, 0, 0);
      stopCamera();
      canvas.toBlob((blob) => takeFile(blob && new File([blob], "camera.jpg", { type: "image/jpeg" })), "image/jpeg", 0.92);
    });
  }

  // the image is shown once the browser has it; one it cannot show (a TIFF, not an image) is not
  el.photo.addEventListener("load", () => { el.stage.hidden = false; });
  el.photo.addEventListener("error", () => { el.stage.hidden = true; });
  el.slider.addEventListener("input", applyScore);
  el.apiKey.addEventListener("change", loadModel);
  if (typeof ResizeObserver === "function") new ResizeObserver(layoutBoxes).observe(el.photo);
  else window.addEventListener("resize", layoutBoxes);

  applyScore();
  loadModel();
})();
