// img2img and inpainting on the page of `ldm ui` (loaded before app.js, whose $ and say it uses). The image to
// edit is read as a data URL and sent as it is; the mask is painted on a canvas of the image's own size (white =
// repaint, black = keep) and sent as a PNG data URL. On the page the strokes show in cyan over the image.
"use strict";
const edit = {image: null, painted: false, last: null, maxBytes: 16 * 2 ** 20};
const maskCanvas = document.createElement("canvas");  // the mask sent: black, white where painted
const DISPLAY = 320;  // the longest side of the image on the page, in CSS pixels
const EDIT_FIELDS = ["strength", "mask_blur", "masked_content", "paste_back"];

function setMode(mode) {
  $("mode").value = mode;
  $("edit-controls").classList.toggle("hidden", mode === "txt2img");
  $("edit").classList.toggle("img2img", mode === "img2img");
  for (const id of ["width", "height"]) $(id).placeholder = mode === "txt2img" ? "native" : "the image's";
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function loadInitImage(file) {
  try {
    if (!/^image\/(png|jpeg|webp)$/.test(file.type)) throw new Error(`${file.name} is not a PNG, JPEG or WebP image`);
    if (file.size > edit.maxBytes) {
      throw new Error(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MiB, above the page's limit of ` +
                      `${edit.maxBytes / 2 ** 20} MiB`);
    }
    const url = await readAsDataURL(file), preview = $("init-preview");
    preview.src = url;
    await preview.decode().catch(() => { throw new Error(`${file.name}: the browser cannot read this image`); });
    const w = preview.naturalWidth, h = preview.naturalHeight, scale = DISPLAY / Math.max(w, h);
    preview.style.width = `${Math.round(w * scale)}px`;
    preview.style.height = `${Math.round(h * scale)}px`;
    for (const canvas of [$("mask-canvas"), maskCanvas]) [canvas.width, canvas.height] = [w, h];
    edit.image = url;
    clearMask();
    for (const option of $("mode").options) option.disabled = false;
    $("init-image-remove").disabled = false;
    if ($("mode").value === "txt2img") setMode("img2img");
    say("generate-status", `${file.name}: ${w}x${h}; choose inpainting in Mode to paint the area to repaint`);
  } catch (e) {
    say("generate-status", e.message, true);
  }
}

function removeInitImage() {
  edit.image = null;
  $("init-image-input").value = "";
  $("init-preview").removeAttribute("src");
  for (const option of $("mode").options) option.disabled = option.value !== "txt2img";
  $("init-image-remove").disabled = true;
  setMode("txt2img");
}

function clearMask() {
  const g = maskCanvas.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, maskCanvas.width, maskCanvas.height);
  $("mask-canvas").getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
  edit.painted = false;
}

// A pointer event's place on the canvas, and the brush's width, in the image's pixels.
function canvasPoint(e) {
  const canvas = $("mask-canvas"), rect = canvas.getBoundingClientRect(), scale = canvas.width / rect.width;
  return {x: (e.clientX - rect.left) * scale, y: (e.clientY - rect.top) * (canvas.height / rect.height),
          width: Number($("brush-size").value) * scale};
}

function paint(from, to) {
  for (const [canvas, colour] of [[maskCanvas, "#fff"], [$("mask-canvas"), "#00e0ff"]]) {
    const g = canvas.getContext("2d");
    g.strokeStyle = g.fillStyle = colour;
    g.lineWidth = to.width;
    g.lineCap = g.lineJoin = "round";
    g.beginPath();
    g.moveTo(from.x, from.y);
    g.lineTo(to.x, to.y);
    g.stroke();
    g.beginPath();
    g.arc(to.x, to.y, to.width / 2, 0, 2 * Math.PI);
    g.fill();
  }
  edit.painted = true;
}

// The form's img2img / inpainting fields for the chosen mode ({} for text to image); throws what is missing.
function editForm() {
  const mode = $("mode").value;
  if (mode === "txt2img" || !edit.image) return {};
  const form = {init_image: edit.image, strength: $("strength").value};
  if (mode === "inpaint") {
    if (!edit.painted) throw new Error("inpainting: paint the area to repaint on the image first, or choose img2img");
    Object.assign(form, {mask: maskCanvas.toDataURL("image/png"), mask_blur: $("mask_blur").value.trim(),
                         masked_content: $("masked_content").value, paste_back: $("paste_back").checked});
  }
  return form;
}

// Fills the img2img / inpainting settings from a dropped PNG's parameters (the image itself is not in them).
function fillEditFields(fields) {
  for (const f of EDIT_FIELDS.filter((f) => fields[f] !== undefined && fields[f] !== null)) {
    if (f === "paste_back") $(f).checked = !!fields[f];
    else $(f).value = fields[f];
  }
  $("strength-value").textContent = $("strength").value;
}

function initEdit(config) {
  if (config.max_upload_bytes) edit.maxBytes = config.max_upload_bytes;
  $("mode").addEventListener("change", () => setMode($("mode").value));
  $("init-image-input").addEventListener("change", () => {
    if ($("init-image-input").files[0]) loadInitImage($("init-image-input").files[0]);
  });
  $("init-image-remove").addEventListener("click", removeInitImage);
  $("mask-clear").addEventListener("click", clearMask);
  for (const id of ["strength", "brush-size"]) {
    $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
  }
  const canvas = $("mask-canvas");
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    edit.last = canvasPoint(e);
    paint(edit.last, edit.last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!edit.last) return;
    const point = canvasPoint(e);
    paint(edit.last, point);
    edit.last = point;
  });
  for (const end of ["pointerup", "pointercancel"]) canvas.addEventListener(end, () => { edit.last = null; });
}
