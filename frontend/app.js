/* Strata web UI: plain JavaScript over the public v1 API, no build step. */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  // Types the browser may show as they are; anything else is checked by the API first.
  const READABLE_TYPES = new Set(["image/jpeg", "image/png", "image/webp"]);
  const READABLE_EXTENSIONS = /\.(jpe?g|png|webp)$/i;
  // The API's default limits: beyond them the API is asked (it answers with the real limits).
  const MIN_SIDE = 16;
  const MAX_BYTES = 20 * 1024 * 1024;

  const ui = {
    form: $("job-form"),
    status: $("service-status"),
    dropzone: $("dropzone"),
    fileInput: $("file-input"),
    fileInfo: $("file-info"),
    fileThumb: $("file-thumb"),
    fileName: $("file-name"),
    fileSize: $("file-size"),
    fileDims: $("file-dims"),
    fileChecking: $("file-checking"),
    fileError: $("file-error"),
    fileErrorTitle: $("file-error-title"),
    fileErrorDetail: $("file-error-detail"),
    model: $("model"),
    modelInfo: $("model-info"),
    removeOptions: $("remove-options"),
    layerOptions: $("layer-options"),
    classicNote: $("classic-note"),
    useBg: $("use-bg"),
    bgColor: $("bg-color"),
    run: $("run"),
    badge: $("result-badge"),
    empty: $("result-empty"),
    busy: $("cutout-busy"),
    busyText: $("cutout-busy-text"),
    progress: $("job-progress"),
    progressLabel: $("progress-label"),
    progressPercent: $("progress-percent"),
    progressBar: $("progress-bar"),
    progressFill: $("progress-fill"),
    progressStep: $("progress-step"),
    cancel: $("cancel-job"),
    resultError: $("result-error"),
    resultErrorTitle: $("result-error-title"),
    resultErrorDetail: $("result-error-detail"),
    cutout: $("cutout-result"),
    cutoutStage: $("cutout-stage"),
    cutoutImage: $("cutout-image"),
    cutoutMeta: $("cutout-meta"),
    cutoutNote: $("cutout-note"),
    cutoutDownload: $("cutout-download"),
    layers: $("layers-result"),
    stack: $("stack-preview"),
    layersMeta: $("layers-meta"),
    layersNote: $("layers-note"),
    layerList: $("layer-list"),
    zip: $("download-zip"),
    psd: $("download-psd"),
    pptx: $("download-pptx"),
    manifest: $("download-manifest"),
    jobList: $("job-list"),
    jobsEmpty: $("jobs-empty"),
    refreshJobs: $("refresh-jobs"),
    keyButton: $("key-button"),
    keyDialog: $("key-dialog"),
    keyForm: $("key-form"),
    keyInput: $("key-input"),
    keyReason: $("key-reason"),
    keyError: $("key-error"),
    keyErrorTitle: $("key-error-title"),
    keyErrorDetail: $("key-error-detail"),
    keySubmit: $("key-submit"),
    keyCancel: $("key-cancel"),
  };

  const state = {
    health: null,
    file: null,          // the chosen File once it is known to be usable
    fileToken: 0,        // bumps on each choice, so a slow check of an old file is ignored
    thumbUrl: null,
    cutoutUrl: null,
    busy: false,
    job: null,           // the layer job on screen
    stream: null,        // its EventSource
    pollTimer: null,
    jobsRequest: 0,
    keysRequired: false, // the service asks for an API key
    signedIn: false,     // this browser holds one in the sign-in cookie
    keyDeclined: false,  // "Not now": ask again only when the person asks
  };

  // ---------------------------------------------------------------- helpers

  function task() {
    return ui.form.elements.task.value;
  }

  function formatBytes(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function baseName(name) {
    return (name || "image").replace(/\.[^.]+$/, "") || "image";
  }

  function relativeTime(iso) {
    const then = Date.parse(iso);
    if (Number.isNaN(then)) return "";
    const seconds = Math.round((then - Date.now()) / 1000);
    const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
    const abs = Math.abs(seconds);
    if (abs < 45) return "just now";
    if (abs < 3600) return rtf.format(Math.round(seconds / 60), "minute");
    if (abs < 86400) return rtf.format(Math.round(seconds / 3600), "hour");
    return rtf.format(Math.round(seconds / 86400), "day");
  }

  function seconds(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
  }

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key in node && typeof value !== "string") node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of [].concat(children)) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  /** title and detail of an error response (RFC 9457 problem+json, or whatever came back). */
  async function problemOf(response) {
    const problem = { status: response.status, title: `Error ${response.status}`, detail: "" };
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body.title) problem.title = body.title;
      if (typeof body.detail === "string") problem.detail = body.detail;
      else if (body.detail !== undefined) problem.detail = JSON.stringify(body.detail);
    } catch {
      problem.detail = text.slice(0, 300) || response.statusText;
    }
    if (response.status === 503 && response.headers.get("Retry-After")) {
      problem.detail += ` (retry in ${response.headers.get("Retry-After")} s)`;
    }
    return problem;
  }

  function networkProblem(error) {
    return { title: "Can’t reach Strata", detail: `The request did not complete (${error.message}). Is the server running?` };
  }

  // ---------------------------------------------------------------- the API and its key

  // On every call. With it the sign-in cookie counts as the key on a request that
  // changes something: a form on another site cannot send it (cross-site forgery).
  const PAGE_HEADERS = { "X-Requested-With": "strata-web" };

  /** fetch() for the API: the page's header, and the key dialog when the answer is 401. */
  async function api(url, init = {}) {
    const response = await fetch(url, { ...init, headers: { ...PAGE_HEADERS, ...init.headers } });
    if (response.status === 401) needKey();
    return response;
  }

  function showSession(session) {
    state.keysRequired = session.keys_required;
    state.signedIn = session.keys_required && Boolean(session.key_id);
    ui.keyButton.hidden = !state.keysRequired;
    ui.keyButton.textContent = state.signedIn ? "Forget key" : "Enter API key";
  }

  function needKey() {
    const revoked = state.signedIn;  // the key this browser held is no longer accepted
    showSession({ keys_required: true, key_id: null });
    setServiceStatus("pending", "API key needed");
    if (!state.keyDeclined) openKeyDialog(revoked);
  }

  function openKeyDialog(revoked = false) {
    if (ui.keyDialog.open) return;
    ui.keyReason.textContent = revoked
      ? "The key this browser used is no longer accepted. Enter a current one."
      : "This Strata asks every caller for an API key. Its operator gives them out.";
    ui.keyError.hidden = true;
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  }

  async function submitKey(event) {
    event.preventDefault();
    const key = ui.keyInput.value.trim();
    if (!key) return showKeyError({ title: "Enter a key", detail: "The field is empty." });
    ui.keySubmit.disabled = true;
    try {
      // Not through api(): a refused key is shown here, not by opening the dialog again.
      const response = await fetch("/v1/session", { method: "POST", headers: { ...PAGE_HEADERS, "X-Api-Key": key } });
      if (!response.ok) return showKeyError(await problemOf(response));
      ui.keyInput.value = "";
      ui.keyDialog.close();
      showSession(await response.json());
      loadEverything();
    } catch (error) {
      showKeyError(networkProblem(error));
    } finally {
      ui.keySubmit.disabled = false;
    }
  }

  function showKeyError(problem) {
    ui.keyErrorTitle.textContent = problem.title;
    ui.keyErrorDetail.textContent = problem.detail;
    ui.keyError.hidden = false;
    ui.keyInput.select();
  }

  async function onKeyButton() {
    if (!state.signedIn) {
      state.keyDeclined = false;
      return openKeyDialog();
    }
    // Signed out only once the server has cleared the cookie: else the browser still
    // holds the key, and the page must not say it does not.
    try {
      const response = await fetch("/v1/session", { method: "DELETE", headers: PAGE_HEADERS });
      if (!response.ok) return showResultError(forgetProblem(await problemOf(response)), true);
    } catch (error) {
      return showResultError(forgetProblem(networkProblem(error)), true);
    }
    stopWatching();
    state.keyDeclined = false;
    needKey();
    loadJobs();  // the list empties and says why
  }

  function forgetProblem(problem) {
    return { title: "The key was not forgotten", detail: `This browser still holds it. ${problem.title}: ${problem.detail}` };
  }

  /** What the page shows from the API: the service, its models, the jobs, a job named in the URL. */
  async function loadEverything() {
    try {
      const response = await api("/v1/session", { headers: { Accept: "application/json" } });
      if (response.status === 401) return;  // the dialog asks for a key; this runs again once one is given
      if (response.ok) showSession(await response.json());
    } catch {
      /* loadHealth below says the service cannot be reached */
    }
    loadHealth();
    loadJobs();
    const match = /^#job=([A-Za-z0-9_-]+)$/.exec(location.hash);
    if (match) reopenJob(match[1]);
  }

  // ---------------------------------------------------------------- health and models

  async function loadHealth() {
    try {
      const response = await api("/v1/health", { headers: { Accept: "application/json" } });
      if (response.status === 401) return;  // needKey() has said so
      if (!response.ok) throw new Error((await problemOf(response)).detail || `HTTP ${response.status}`);
      state.health = await response.json();
    } catch (error) {
      setServiceStatus("down", "Service unavailable");
      ui.model.replaceChildren(el("option", { text: "No models available" }));
      ui.modelInfo.textContent = `Could not read /v1/health: ${error.message}`;
      return;
    }
    const { models, layer_models: layerModels } = state.health;
    const everything = [...Object.values(models), ...Object.values(layerModels || {})];
    const fallbacks = everything.filter((m) => m.fallback_reason).length;
    const count = everything.length;
    if (state.health.status === "ok") {
      setServiceStatus("ok", fallbacks ? `${count} models · ${fallbacks} on fallback` : `${count} models ready`);
    } else {
      setServiceStatus("degraded", "Degraded");
    }
    const layersInput = $("task-layers");
    const hasLayers = Object.keys(layerModels || {}).length > 0;
    layersInput.disabled = !hasLayers;
    if (!hasLayers) layersInput.nextElementSibling.title = "This deployment serves no layer model";
    populateModels();
  }

  function setServiceStatus(kind, text) {
    ui.status.dataset.state = kind;
    ui.status.querySelector(".status-text").textContent = text;
  }

  function modelsForTask() {
    if (!state.health) return { models: {}, fallback: null };
    return task() === "layers"
      ? { models: state.health.layer_models || {}, fallback: state.health.default_layer_model }
      : { models: state.health.models || {}, fallback: state.health.default_model };
  }

  function populateModels() {
    const { models, fallback } = modelsForTask();
    const remembered = ui.model.dataset[task()];
    ui.model.replaceChildren();
    for (const [name, info] of Object.entries(models)) {
      const engine = info.engine || "unknown engine";
      let text = `${name} · ${engine}`;
      if (info.fallback_reason) text += " (fallback)";
      if (!info.loaded) text += " (not loaded)";
      ui.model.append(el("option", { value: name, text }));
    }
    const names = Object.keys(models);
    ui.model.disabled = names.length === 0;
    if (names.length === 0) ui.model.append(el("option", { text: "No models available" }));
    ui.model.value = names.includes(remembered) ? remembered : (names.includes(fallback) ? fallback : names[0] || "");
    describeModel();
    updateRunButton();
  }

  function describeModel() {
    const { models } = modelsForTask();
    const info = models[ui.model.value];
    ui.modelInfo.replaceChildren();
    if (!info) return;
    const engine = info.engine || "unknown";
    const tag = el("span", { class: info.fallback_reason ? "engine-tag fallback" : "engine-tag",
                             text: info.fallback_reason ? `${engine} fallback` : engine });
    const bits = [info.device, info.dtype].filter(Boolean).join(" · ");
    ui.modelInfo.append(tag, bits ? `engine on ${bits}` : "engine");
    if (info.fallback_reason) ui.modelInfo.append(el("br"), `Configured model unavailable: ${info.fallback_reason}`);
    const classic = task() === "layers" && engine === "classic";
    ui.classicNote.hidden = !classic;
    $("diffusion-options").classList.toggle("unused", classic);
  }

  // ---------------------------------------------------------------- the image

  function clearFileError() {
    ui.fileError.hidden = true;
  }

  function showFileError(problem) {
    ui.fileErrorTitle.textContent = problem.title;
    ui.fileErrorDetail.textContent = problem.detail;
    ui.fileError.hidden = false;
  }

  async function decodeInBrowser(file) {
    try {
      const bitmap = await createImageBitmap(file);
      const size = { width: bitmap.width, height: bitmap.height };
      bitmap.close();
      return size;
    } catch {
      return null;
    }
  }

  function probeModel() {
    const models = (state.health && state.health.models) || {};
    const classic = Object.keys(models).find((name) => models[name].engine === "classic");
    return classic || (state.health && state.health.default_model) || null;
  }

  /** Send the file to the API as it is (an alpha mask, the cheapest answer) to hear its verdict. */
  async function askApi(file) {
    const params = new URLSearchParams({ output: "mask" });
    const model = probeModel();
    if (model) params.set("model", model);
    const body = new FormData();
    body.append("image", file, file.name);
    const response = await api(`/v1/remove-background?${params}`, { method: "POST", body });
    if (!response.ok) return { problem: await problemOf(response) };
    await response.arrayBuffer();
    return { width: Number(response.headers.get("X-Width")), height: Number(response.headers.get("X-Height")) };
  }

  async function chooseFile(file) {
    const token = ++state.fileToken;
    state.file = null;
    clearFileError();
    if (state.thumbUrl) URL.revokeObjectURL(state.thumbUrl);
    state.thumbUrl = null;
    ui.fileThumb.removeAttribute("src");
    ui.fileThumb.hidden = true;
    ui.fileName.textContent = file.name || "(unnamed file)";
    ui.fileName.title = file.name || "";
    ui.fileSize.textContent = formatBytes(file.size);
    ui.fileDims.textContent = "";
    ui.fileInfo.hidden = false;
    ui.fileChecking.hidden = false;
    updateRunButton();

    const readable = READABLE_TYPES.has(file.type) || (!file.type && READABLE_EXTENSIONS.test(file.name));
    let size = readable ? await decodeInBrowser(file) : null;
    const plausible = size && Math.min(size.width, size.height) >= MIN_SIDE && file.size > 0 && file.size <= MAX_BYTES;
    if (!plausible) {
      // Let the API judge: its problem detail is the reason shown.
      try {
        const verdict = await askApi(file);
        if (token !== state.fileToken) return;
        if (verdict.problem) {
          ui.fileChecking.hidden = true;
          ui.fileDims.textContent = "";
          showFileError(verdict.problem);
          ui.fileInput.value = "";
          return;
        }
        size = { width: verdict.width, height: verdict.height };
      } catch (error) {
        if (token !== state.fileToken) return;
        ui.fileChecking.hidden = true;
        showFileError(networkProblem(error));
        return;
      }
    }
    if (token !== state.fileToken) return;
    ui.fileChecking.hidden = true;
    ui.fileDims.textContent = `${size.width} × ${size.height} px`;
    if (readable) {
      state.thumbUrl = URL.createObjectURL(file);
      ui.fileThumb.src = state.thumbUrl;
      ui.fileThumb.hidden = false;
    }
    state.file = file;
    updateRunButton();
  }

  function wireDropzone() {
    ui.fileInput.addEventListener("change", () => {
      const file = ui.fileInput.files && ui.fileInput.files[0];
      if (file) chooseFile(file);
    });
    const zone = ui.dropzone;
    const over = (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
      zone.classList.add("dragover");
    };
    zone.addEventListener("dragenter", over);
    zone.addEventListener("dragover", over);
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.classList.remove("dragover");
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragover");
      const file = event.dataTransfer.files && event.dataTransfer.files[0];
      if (file) chooseFile(file);
    });
    // A file dropped beside the zone must not navigate away from the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => {
      event.preventDefault();
      const file = event.dataTransfer.files && event.dataTransfer.files[0];
      if (file) chooseFile(file);
    });
  }

  // ---------------------------------------------------------------- task form

  function onTaskChange() {
    const layers = task() === "layers";
    ui.removeOptions.hidden = layers;
    ui.layerOptions.hidden = !layers;
    populateModels();
  }

  function updateRunButton() {
    const label = task() === "layers" ? "Decompose into layers" : "Remove background";
    ui.run.textContent = state.busy ? "Working…" : label;
    ui.run.disabled = state.busy || !state.file || !ui.model.value || ui.model.disabled;
  }

  function numberParam(params, name, input) {
    if (input.value.trim() !== "") params.set(name, input.value.trim());
  }

  async function onSubmit(event) {
    event.preventDefault();
    if (ui.run.disabled || !state.file) return;
    if (task() === "layers") await runLayers();
    else await runCutout();
  }

  // ---------------------------------------------------------------- result panel

  /** On a one-column layout the result sits below the form: bring it into view. */
  function revealResult() {
    if (!window.matchMedia("(max-width: 920px)").matches) return;
    const reduce = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    $("result-card").scrollIntoView({ block: "start", behavior: reduce ? "auto" : "smooth" });
  }

  function showPanel(which) {
    ui.empty.hidden = which !== "empty";
    ui.busy.hidden = which !== "busy";
    ui.cutout.hidden = which !== "cutout";
    ui.layers.hidden = which !== "layers";
    ui.progress.hidden = which !== "job" && which !== "layers";
    if (which !== "error") ui.resultError.hidden = true;
  }

  function showResultError(problem, keep) {
    if (!keep) showPanel("error");
    ui.resultErrorTitle.textContent = problem.title;
    ui.resultErrorDetail.textContent = problem.detail;
    ui.resultError.hidden = false;
  }

  function setBadge(text, status) {
    ui.badge.hidden = !text;
    ui.badge.textContent = text || "";
    ui.badge.dataset.status = status || "";
  }

  function stopWatching() {
    if (state.stream) state.stream.close();
    state.stream = null;
    clearTimeout(state.pollTimer);
    state.pollTimer = null;
  }

  // ---------------------------------------------------------------- cutouts

  async function runCutout() {
    stopWatching();
    state.job = null;
    markCurrentJob();
    const file = state.file;
    const params = new URLSearchParams({
      model: ui.model.value,
      output: $("output").value,
      format: $("format").value,
      crop: String($("crop").checked),
      refine_foreground: String($("refine").checked),
    });
    if (ui.useBg.checked) params.set("bg_color", ui.bgColor.value);

    const info = modelsForTask().models[ui.model.value] || {};
    ui.busyText.textContent = `Removing the background with ${ui.model.value} (${info.engine || "model"})…`;
    setBadge("Working", "running");
    showPanel("busy");
    revealResult();
    await postImage(`/v1/remove-background?${params}`, file, async (response) => {
      const blob = await response.blob();
      if (state.cutoutUrl) URL.revokeObjectURL(state.cutoutUrl);
      state.cutoutUrl = URL.createObjectURL(blob);
      const h = response.headers;
      const output = params.get("output");
      const format = params.get("format");
      ui.cutoutImage.alt = output === "mask" ? `Alpha mask of ${file.name}` : `Cutout of ${file.name}`;
      await new Promise((resolve) => {
        ui.cutoutImage.onload = ui.cutoutImage.onerror = resolve;
        ui.cutoutImage.src = state.cutoutUrl;
      });
      ui.cutoutMeta.replaceChildren(
        el("strong", { text: `${h.get("X-Width")} × ${h.get("X-Height")} px` }),
        ` · ${format.toUpperCase()} ${formatBytes(blob.size)} · ${h.get("X-Model")} (${h.get("X-Engine")})`
          + ` · ${seconds(Number(h.get("X-Processing-Ms")))}`,
      );
      showEngineNote(ui.cutoutNote, (state.health?.models || {})[h.get("X-Model")] || {}, h.get("X-Engine"),
                     h.get("X-Engine-Warning"));
      ui.cutoutDownload.href = state.cutoutUrl;
      ui.cutoutDownload.download = `${baseName(file.name)}-${output}.${format}`;
      ui.cutoutDownload.textContent = output === "mask" ? "Download mask" : "Download cutout";
      setBadge(output === "mask" ? "Mask ready" : "Cutout ready", "succeeded");
      showPanel("cutout");
    });
  }

  // Posts `file` to `url` with the run button held disabled; hands a successful
  // response to `done`, and shows a failed one's problem (or the network error).
  async function postImage(url, file, done) {
    const body = new FormData();
    body.append("image", file, file.name);
    state.busy = true;
    updateRunButton();
    try {
      const response = await api(url, { method: "POST", body });
      if (!response.ok) {
        setBadge("Failed", "failed");
        showResultError(await problemOf(response));
        return;
      }
      await done(response);
    } catch (error) {
      setBadge("Failed", "failed");
      showResultError(networkProblem(error));
    } finally {
      state.busy = false;
      updateRunButton();
    }
  }

  function wireBackdrops() {
    for (const button of document.querySelectorAll(".swatch")) {
      button.addEventListener("click", () => {
        for (const other of document.querySelectorAll(".swatch")) other.setAttribute("aria-pressed", String(other === button));
        ui.cutoutStage.dataset.backdrop = button.dataset.backdrop;
      });
    }
  }

  // ---------------------------------------------------------------- layer jobs

  async function runLayers() {
    const file = state.file;
    const params = new URLSearchParams({
      model: ui.model.value,
      layers: $("layers").value || "4",
      resolution: $("resolution").value,
    });
    numberParam(params, "steps", $("steps"));
    numberParam(params, "seed", $("seed"));
    numberParam(params, "true_cfg_scale", $("cfg"));
    const prompt = $("prompt").value.trim();
    if (prompt) params.set("prompt", prompt);

    stopWatching();
    setBadge("Uploading", "queued");
    showPanel("job");
    revealResult();
    setProgress({ status: "queued", progress: 0, step: null, total_steps: null });
    ui.cancel.hidden = true;
    await postImage(`/v1/layers?${params}`, file, async (response) => {
      openJob(await response.json(), file.name);
      loadJobs();
    });
  }

  function statusLabel(job) {
    if (job.status === "running" && job.cancel_requested) return "Cancelling…";
    return { queued: "Queued", running: "Decomposing", succeeded: "Done", failed: "Failed",
             cancelled: "Cancelled" }[job.status] || job.status;
  }

  function setProgress(job) {
    const fraction = job.status === "succeeded" ? 1 : Math.max(0, Math.min(1, job.progress || 0));
    const percent = Math.round(fraction * 100);
    ui.progressPercent.textContent = `${percent}%`;
    ui.progressFill.style.width = `${percent}%`;
    ui.progressBar.setAttribute("aria-valuenow", String(percent));
    ui.progressBar.setAttribute("aria-valuetext", `${percent}%`);
    ui.progressLabel.textContent = statusLabel(job);
    $("progress-spinner").hidden = TERMINAL.has(job.status);
    if (job.step && job.total_steps) {
      ui.progressStep.textContent = `Step ${job.step} of ${job.total_steps}`;
    } else if (job.status === "queued") {
      ui.progressStep.textContent = "Waiting for a worker…";
    }
  }

  function openJob(job, fileName) {
    stopWatching();
    state.job = { ...job, fileName };
    history.replaceState(null, "", `#job=${encodeURIComponent(job.id)}`);
    markCurrentJob();
    showPanel("job");
    applyJob(job);
    if (!TERMINAL.has(job.status)) watch(job.id);
  }

  function applyJob(job) {
    if (!state.job || state.job.id !== job.id) return;
    // A late answer (e.g. the DELETE's "cancelling") must not undo a job's end.
    if (TERMINAL.has(state.job.status) && !TERMINAL.has(job.status)) return;
    if (job.status === "running" && state.job.status === "running" && (job.step || 0) < (state.job.step || 0)) {
      // The bar never runs backwards while a job runs: keep the latest step seen.
      job = { ...job, step: state.job.step, total_steps: state.job.total_steps, progress: state.job.progress };
    }
    const changed = state.job.status !== job.status;
    Object.assign(state.job, job);
    if (changed) updateJobItem(state.job);
    setProgress(job);
    setBadge(statusLabel(job), job.status);
    const running = !TERMINAL.has(job.status);
    ui.cancel.hidden = !running;
    ui.cancel.disabled = Boolean(job.cancel_requested);
    ui.cancel.textContent = job.cancel_requested ? "Cancelling…" : "Cancel job";
    if (!running) {
      stopWatching();
      finishJob(job);
      loadJobs();
    }
  }

  function finishJob(job) {
    if (job.status === "succeeded" && job.result) {
      const started = Date.parse(job.started_at);
      const finished = Date.parse(job.finished_at);
      const took = Number.isFinite(started) && Number.isFinite(finished) ? ` in ${seconds(finished - started)}` : "";
      ui.progressStep.textContent = `${job.result.layers.length} layers${took}`;
      renderLayers(job);
      showPanel("layers");
    } else if (job.status === "failed") {
      ui.progressStep.textContent = "";
      showResultError({ title: "The job failed", detail: job.error || "No reason was given." }, true);
    } else if (job.status === "cancelled") {
      ui.progressStep.textContent = "Stopped before it finished.";
    }
  }

  function watch(jobId) {
    const stream = new EventSource(`/v1/jobs/${encodeURIComponent(jobId)}/events`);
    state.stream = stream;
    stream.addEventListener("status", (event) => {
      applyJob(JSON.parse(event.data));
    });
    stream.addEventListener("progress", (event) => {
      const data = JSON.parse(event.data);
      if (!state.job || state.job.id !== jobId || TERMINAL.has(state.job.status)) return;
      if (state.job.step && data.step < state.job.step) return;  // a late report of an earlier step
      state.job.progress = data.progress;
      state.job.step = data.step;
      state.job.total_steps = data.total_steps;
      if (state.job.status !== "running") {
        state.job.status = "running";
        updateJobItem(state.job);
      }
      setProgress(state.job);
      setBadge(statusLabel(state.job), "running");
    });
    stream.addEventListener("error", () => {
      // The stream ends with the job; if it broke before that, follow the job by polling.
      if (state.stream !== stream) return;
      stream.close();
      state.stream = null;
      if (state.job && state.job.id === jobId && !TERMINAL.has(state.job.status)) poll(jobId);
    });
  }

  async function poll(jobId) {
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
      if (response.ok) applyJob(await response.json());
      else if (response.status === 404) return showResultError(await problemOf(response));
    } catch {
      /* retried below */
    }
    if (state.job && state.job.id === jobId && !TERMINAL.has(state.job.status)) {
      state.pollTimer = setTimeout(() => poll(jobId), 1000);
    }
  }

  async function cancelJob() {
    const job = state.job;
    if (!job) return;
    ui.cancel.disabled = true;
    ui.cancel.textContent = "Cancelling…";
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
      if (response.status === 202) applyJob(await response.json());
      else if (!response.ok) showResultError(await problemOf(response), true);
    } catch (error) {
      showResultError(networkProblem(error), true);
    }
  }

  // Beside a result made by a weights-free engine: which engine, what it is for, why the
  // configured model is not serving and how to serve the real ones (all from /v1/health),
  // the engine's warning about this result, and a link to the setup section of the
  // README (served at /setup). Hidden for a model's results that came with no warning.
  function showEngineNote(note, info, engine, warning) {
    note.replaceChildren();
    note.hidden = !(engine === "classic" || warning);
    if (note.hidden) return;
    note.append(el("strong", { text: info.fallback_reason
      ? `Made by the ${engine} engine: the configured model is not serving.`
      : `Made by the ${engine} engine.` }));
    if (info.fallback_reason) note.append(el("span", { text: `Why: ${info.fallback_reason}` }));
    if (info.engine_about) note.append(el("span", { text: `The ${engine} engine is ${info.engine_about}.` }));
    if (warning) note.append(el("span", { class: "engine-warning", text: `About this result: ${warning}.` }));
    const setup = info.real_models_setup;
    note.append(el("span", {}, [
      setup ? `${setup[0].toUpperCase()}${setup.slice(1)}. ` : "",
      el("a", { class: "setup-link", href: "/setup", target: "_blank", rel: "noopener",
                text: "How to serve the real models" }),
    ]));
  }

  function bboxText(bbox) {
    if (!bbox) return "empty";
    const [x, y, w, h] = bbox;
    return `${w}×${h} @ ${x},${y}`;
  }

  function renderLayers(job) {
    const { result } = job;
    const layers = [...result.layers].sort((a, b) => a.index - b.index);
    const ratio = result.width / result.height;
    const inner = el("div", { class: "stack-inner" });
    inner.style.aspectRatio = `${result.width} / ${result.height}`;
    // As large as fits, never past the image's own size.
    inner.style.width = `min(100%, ${result.width}px, calc(62vh * ${ratio.toFixed(4)}))`;
    for (const layer of layers) {
      inner.append(el("img", { src: layer.url, alt: "", dataset: { index: String(layer.index) } }));
    }
    ui.stack.replaceChildren(inner);

    ui.layerList.replaceChildren();
    for (const layer of [...layers].reverse()) {
      const toggle = el("input", { type: "checkbox", checked: true, "aria-label": `Show ${layer.name}`,
                                   dataset: { index: String(layer.index) } });
      toggle.addEventListener("change", () => {
        const img = inner.querySelector(`img[data-index="${layer.index}"]`);
        img.classList.toggle("off", !toggle.checked);
        toggle.closest(".layer-card").classList.toggle("off", !toggle.checked);
      });
      const file = `layer_${String(layer.index).padStart(2, "0")}.png`;
      ui.layerList.append(el("li", { class: "layer-card", dataset: { index: String(layer.index) } }, [
        el("div", { class: "layer-thumb checker" }, el("img", { src: layer.url, alt: layer.name, loading: "lazy" })),
        el("div", { class: "layer-body" }, [
          el("p", { class: "layer-name", text: layer.name }),
          el("p", { class: "layer-bbox", text: `bbox ${bboxText(layer.bbox)}`,
                    title: layer.bbox ? `x ${layer.bbox[0]}, y ${layer.bbox[1]}, width ${layer.bbox[2]}, height ${layer.bbox[3]}` : "No visible pixels" }),
          el("div", { class: "layer-actions" }, [
            el("label", { class: "switch" }, [toggle, "Visible"]),
            el("a", { class: "btn small", href: layer.url, download: file, "aria-label": `Download ${layer.name} as PNG`, text: "PNG" }),
          ]),
        ]),
      ]));
    }
    // The ZIP, PSD and PPTX are named by the server (Content-Disposition: the job id).
    ui.zip.href = result.zip_url;
    ui.zip.setAttribute("aria-label", "Download all layers as ZIP");
    ui.psd.href = result.psd_url;
    ui.psd.setAttribute("aria-label", "Download as PSD");
    ui.pptx.href = result.pptx_url;
    ui.pptx.setAttribute("aria-label", "Download as PowerPoint (PPTX)");
    ui.manifest.href = result.manifest_url;
    ui.manifest.download = `${job.id}-manifest.json`;
    ui.manifest.setAttribute("aria-label", "Download the manifest (JSON)");
    showEngineNote(ui.layersNote, (state.health?.layer_models || {})[result.model] || {}, result.engine,
                   job.warning);
    ui.layersMeta.replaceChildren(
      el("strong", { text: `${result.layers.length} layers · ${result.width} × ${result.height} px` }),
      ` · ${result.model} (${result.engine})`,
    );
  }

  // ---------------------------------------------------------------- recent jobs

  async function loadJobs() {
    const request = ++state.jobsRequest;  // only the latest listing is drawn
    let jobs;
    try {
      const response = await api("/v1/jobs?limit=8");
      if (response.status === 401) throw new Error("enter an API key to see your jobs");
      if (!response.ok) throw new Error((await problemOf(response)).detail);
      jobs = (await response.json()).jobs;
      if (request !== state.jobsRequest) return;
    } catch (error) {
      if (request !== state.jobsRequest) return;
      ui.jobList.replaceChildren();
      ui.jobsEmpty.textContent = `Could not list jobs: ${error.message}`;
      ui.jobsEmpty.hidden = false;
      return;
    }
    ui.jobsEmpty.textContent = "No layer jobs yet. Decompose an image and it appears here.";
    ui.jobsEmpty.hidden = jobs.length > 0;
    ui.jobList.replaceChildren(...jobs.map(jobItem));
    markCurrentJob();
  }

  function jobItem(job) {
    const p = job.params || {};
    const short = job.id.slice(0, 8);
    const running = !TERMINAL.has(job.status);
    const title = `${p.layers || "?"} layers${p.width ? ` · ${p.width} × ${p.height}` : ""}`;
    const status = job.status.charAt(0).toUpperCase() + job.status.slice(1);
    return el("li", { class: "job-item", dataset: { id: job.id } }, [
      el("div", { class: "job-main" }, [
        el("span", { class: "job-title", text: title }),
        el("span", { class: "job-sub" }, [
          el("span", { class: "badge", dataset: { status: job.status }, text: status }),
          el("span", { class: "job-when", text: `${p.model || ""} · ${relativeTime(job.created_at)}` }),
          el("code", { text: short }),
        ]),
      ]),
      el("div", { class: "job-actions" }, [
        el("button", { type: "button", class: "btn small", text: "Open", "aria-label": `Open job ${short}`,
                       onclick: () => reopenJob(job.id) }),
        el("button", { type: "button", class: "btn small subtle danger", text: running ? "Cancel" : "Delete",
                       "aria-label": `${running ? "Cancel" : "Delete"} job ${short}`,
                       onclick: () => deleteJob(job.id) }),
      ]),
    ]);
  }

  function updateJobItem(job) {
    const item = ui.jobList.querySelector(`[data-id="${CSS.escape(job.id)}"]`);
    if (!item) return;
    const focused = [...item.querySelectorAll("button")].indexOf(document.activeElement);
    const fresh = jobItem(job);
    item.replaceWith(fresh);
    if (focused >= 0) fresh.querySelectorAll("button")[focused].focus();  // keep a keyboard user's place
    markCurrentJob();
  }

  function markCurrentJob() {
    for (const item of ui.jobList.children) {
      const current = Boolean(state.job) && item.dataset.id === state.job.id;
      item.classList.toggle("current", current);
      if (current) item.setAttribute("aria-current", "true");
      else item.removeAttribute("aria-current");
    }
  }

  async function reopenJob(jobId) {
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
      if (!response.ok) {
        showResultError(await problemOf(response));
        return loadJobs();
      }
      openJob(await response.json());
      $("result-card").scrollIntoView({ block: "start", behavior: "smooth" });
    } catch (error) {
      showResultError(networkProblem(error));
    }
  }

  async function deleteJob(jobId) {
    try {
      const response = await api(`/v1/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE" });
      if (!response.ok && response.status !== 404) {
        showResultError(await problemOf(response), true);
      } else if (response.status === 202) {
        applyJob(await response.json());
      } else if (state.job && state.job.id === jobId) {
        stopWatching();
        state.job = null;
        history.replaceState(null, "", location.pathname);
        setBadge("", "");
        showPanel("empty");
      }
    } catch (error) {
      showResultError(networkProblem(error), true);
    }
    loadJobs();
  }

  // ---------------------------------------------------------------- start

  function start() {
    wireDropzone();
    wireBackdrops();
    for (const radio of ui.form.elements.task) radio.addEventListener("change", onTaskChange);
    ui.model.addEventListener("change", () => {
      ui.model.dataset[task()] = ui.model.value;
      describeModel();
      updateRunButton();
    });
    ui.useBg.addEventListener("change", () => { ui.bgColor.disabled = !ui.useBg.checked; });
    ui.form.addEventListener("submit", onSubmit);
    ui.cancel.addEventListener("click", cancelJob);
    ui.refreshJobs.addEventListener("click", loadJobs);
    ui.keyForm.addEventListener("submit", submitKey);
    ui.keyCancel.addEventListener("click", () => {
      state.keyDeclined = true;
      ui.keyDialog.close();
    });
    ui.keyDialog.addEventListener("cancel", () => { state.keyDeclined = true; });  // Escape
    ui.keyButton.addEventListener("click", onKeyButton);
    onTaskChange();
    loadEverything();
  }

  start();
})();
