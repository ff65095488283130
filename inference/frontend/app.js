/* abfleet end-user page: Bengaluru home-price estimate + feedback. Plain JS, no framework, no build step. */
"use strict";

/* ---------- pure formatting helpers (also tested through node) ---------- */

/** Group an integer string the Indian way: last 3 digits, then pairs (6250000 -> "62,50,000"). */
function groupIndian(digits) {
  if (digits.length <= 3) return digits;
  const head = digits.slice(0, -3), tail = digits.slice(-3);
  return head.replace(/\B(?=(\d{2})+$)/g, ",") + "," + tail;
}

/** Lakhs -> rupees with Indian grouping, rounded to whole rupees: 62.5 -> "₹ 62,50,000". */
function formatRupees(lakhs) {
  const n = Number(lakhs);
  if (lakhs === null || lakhs === "" || !Number.isFinite(n)) return "";
  const rupees = Math.round(n * 100000);
  const sign = rupees < 0 ? "-" : "";
  return "₹ " + sign + groupIndian(String(Math.abs(rupees)));
}

/** Lakhs with at most 2 decimals and Indian grouping: 62.5 -> "62.5 lakhs", 1 -> "1 lakh". */
function formatLakhs(lakhs) {
  const n = Number(lakhs);
  if (lakhs === null || lakhs === "" || !Number.isFinite(n)) return "";
  const r = Math.round(n * 100) / 100;
  const [int, frac] = Math.abs(r).toFixed(2).replace(/\.?0+$/, "").split(".");
  const text = (r < 0 ? "-" : "") + groupIndian(int) + (frac ? "." + frac : "");
  return text + (r === 1 ? " lakh" : " lakhs");
}

/** Crores for big amounts (>= 100 lakhs): 150 -> "1.5 crore"; "" below that. */
function formatCrores(lakhs) {
  const n = Number(lakhs);
  if (!Number.isFinite(n) || n < 100) return "";
  return String(Math.round(n) / 100).replace(/(\.\d{2})\d+$/, "$1") + " crore";
}

/* ---------- page ---------- */

function initPage() {
  const $ = (id) => document.getElementById(id);
  const form = $("estimate-form"), submitBtn = $("submit"), errorBox = $("error");
  const locInput = $("location"), datalist = $("location-list");
  const resultCard = $("result-card"), feedback = $("feedback");
  const starsBox = $("stars"), starInputs = Array.from(document.querySelectorAll("input[name=stars]"));
  const quickBtns = Array.from(document.querySelectorAll(".quick-buttons button"));
  const actualInput = $("actual-price"), actualBtn = $("actual-submit");
  const fbOk = $("feedback-ok"), fbError = $("feedback-error");
  const FIELDS = ["location", "total_sqft", "bhk", "bath"];
  let locations = [];
  let current = null;   // {prediction_id} of the estimate on screen
  let requestSeq = 0;   // ignore answers to superseded submissions
  const FEEDBACK_TRIES = 4;  // a 503 (the store is away, come back after Retry-After) is sent again, this many tries in all

  // Same-origin fetch; default credentials so the router's user-id cookie goes along.
  async function api(path, body) {
    const opts = { credentials: "same-origin", headers: { Accept: "application/json" } };
    if (body !== undefined) {
      opts.method = "POST";
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      return { ok: false, status: 0, data: {}, message: "Couldn't reach the estimator. Check your connection and try again." };
    }
    let data = {};
    try { data = await res.json(); } catch (e) { data = {}; }
    if (data === null || typeof data !== "object") data = {};
    let message = typeof data.error === "string" && data.error.trim() ? data.error.trim() : "";
    if (!res.ok && !message) {
      message = res.status >= 500
        ? `The estimator is unavailable right now (error ${res.status}). Please try again in a moment.`
        : `The request was refused (error ${res.status}).`;
    }
    return { ok: res.ok, status: res.status, data, message, retryAfter: res.headers.get("Retry-After") };
  }

  /** Seconds to wait before another try: the server's Retry-After (whole seconds), kept within 1..60; 5 without one. */
  function retryDelay(header) {
    const n = Number(header);
    return header !== null && header !== "" && Number.isFinite(n) ? Math.min(60, Math.max(1, Math.ceil(n))) : 5;
  }
  const sleep = (s) => new Promise((done) => setTimeout(done, s * 1000));

  /* --- form errors --- */
  function clearErrors() {
    errorBox.textContent = "";
    for (const f of FIELDS) {
      $(f).removeAttribute("aria-invalid");
      $(f + "-msg").textContent = "";
    }
  }
  function showErrors(list) {  // list of {field?, message}
    const onFields = list.filter((e) => e.field && FIELDS.includes(e.field)).length;
    errorBox.textContent = list.length === 1 || onFields < list.length
      ? list.map((e) => e.message).join(" ")
      : `Please fix the ${list.length} highlighted fields.`;
    let first = null;
    for (const e of list) {
      if (!e.field || !FIELDS.includes(e.field)) continue;
      $(e.field).setAttribute("aria-invalid", "true");
      $(e.field + "-msg").textContent = e.message;
      first = first || $(e.field);
    }
    if (first) first.focus();
  }

  for (const f of FIELDS) {  // an edited field is no longer marked invalid
    $(f).addEventListener("input", () => { $(f).removeAttribute("aria-invalid"); $(f + "-msg").textContent = ""; });
  }

  /* --- client-side checks (bounds come from the inputs' min/max; the server has the last word) --- */
  function readNumber(id, label, unit, integer) {
    const el = $(id), raw = el.value.trim(), errs = [];
    const min = el.min === "" ? null : Number(el.min), max = el.max === "" ? null : Number(el.max);
    const fmt = (v) => v.toLocaleString("en-IN");
    const range = min !== null && max !== null ? ` from ${fmt(min)} to ${fmt(max)}${unit}` : "";
    const n = Number(raw);
    if (raw === "" || !Number.isFinite(n)) errs.push(`Enter the ${label}${range ? " (" + range.trim() + ")" : ""}.`);
    else if (integer && !Number.isInteger(n)) errs.push(`The ${label} must be a whole number${range}.`);
    else if (min !== null && n < min) errs.push(`The ${label} must be at least ${fmt(min)}${unit}${id === "total_sqft" ? " — enter the built-up area in square feet" : ""}.`);
    else if (max !== null && n > max) errs.push(`The ${label} must be at most ${fmt(max)}${unit}.`);
    return { value: n, error: errs[0] };
  }

  function collect() {
    const errors = [];
    let loc = locInput.value.trim();
    if (!loc) errors.push({ field: "location", message: "Choose a location: start typing and pick one from the list." });
    else {
      const match = locations.find((l) => l.toLowerCase() === loc.toLowerCase());
      if (match) { loc = match; locInput.value = match; }
    }
    const sqft = readNumber("total_sqft", "area", " sq ft", false);
    const bhk = readNumber("bhk", "number of bedrooms (BHK)", "", true);
    const bath = readNumber("bath", "number of bathrooms", "", true);
    for (const [field, r] of [["total_sqft", sqft], ["bhk", bhk], ["bath", bath]]) {
      if (r.error) errors.push({ field, message: r.error });
    }
    return { errors, body: { location: loc, total_sqft: sqft.value, bhk: bhk.value, bath: bath.value } };
  }

  /* --- locations --- */
  async function loadLocations() {
    const r = await api("/api/get_location_names");
    const list = r.ok && Array.isArray(r.data.locations) ? r.data.locations.filter((x) => typeof x === "string") : null;
    if (!list) {
      locInput.placeholder = "Type a location";
      errorBox.textContent = "Couldn't load the list of locations. You can still type a location name. " + (r.message || "");
      return;
    }
    locations = list;
    const frag = document.createDocumentFragment();
    for (const name of list) { const o = document.createElement("option"); o.value = name; frag.appendChild(o); }
    datalist.replaceChildren(frag);
    locInput.placeholder = "e.g. " + (list.find((l) => l !== "other") || "Whitefield");
  }

  /* --- estimate --- */
  function hideResult() {
    resultCard.hidden = true;
    feedback.hidden = true;
    for (const id of ["price-rupees", "price-lakhs", "price-crores", "model-version"]) $(id).textContent = "";
    current = null;
  }

  function showResult(data) {
    const lakhs = Number(data.estimated_price);
    $("price-rupees").textContent = formatRupees(lakhs);
    $("price-lakhs").textContent = formatLakhs(lakhs);
    const cr = formatCrores(lakhs);
    $("price-crores").textContent = cr ? " · " + cr : "";
    const v = data.model_version === undefined || data.model_version === null ? "" : String(data.model_version);
    $("model-version").textContent = v ? "model " + (/^v/i.test(v) ? v : "v" + v) : "";
    resultCard.hidden = false;
    current = { prediction_id: data.prediction_id };
    resetFeedback();
    feedback.hidden = !data.prediction_id;
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    const { errors, body } = collect();
    if (errors.length) { hideResult(); showErrors(errors); return; }
    const seq = ++requestSeq;
    hideResult();
    submitBtn.disabled = true;
    submitBtn.textContent = "Estimating…";
    $("result").setAttribute("aria-busy", "true");
    const r = await api("/api/predict_home_price", body);
    if (seq !== requestSeq) return;
    submitBtn.disabled = false;
    submitBtn.textContent = "Estimate price";
    $("result").removeAttribute("aria-busy");
    if (r.ok && Number.isFinite(Number(r.data.estimated_price)) && r.data.estimated_price !== null) {
      showResult(r.data);
    } else {
      const field = typeof r.data.field === "string" ? r.data.field : undefined;
      showErrors([{ field, message: r.message || "The estimator sent an answer we couldn't read. Please try again." }]);
    }
  });

  /* --- feedback --- */
  function setStars(disabled) {
    starsBox.disabled = disabled;
    for (const i of starInputs) i.disabled = disabled;
    $("rating-submit").disabled = disabled;
  }
  function setQuick(disabled) { for (const b of quickBtns) b.disabled = disabled; }
  function setActual(disabled) { actualInput.disabled = disabled; actualBtn.disabled = disabled; }

  function resetFeedback() {
    for (const i of starInputs) i.checked = false;
    setStars(false); setQuick(false); setActual(false);
    for (const b of quickBtns) b.removeAttribute("aria-pressed");
    actualInput.value = "";
    actualInput.removeAttribute("aria-invalid");
    fbOk.textContent = ""; fbError.textContent = "";
  }

  function addThanks(text) {  // confirmations accumulate (one per kind of feedback)
    const line = document.createElement("span");
    line.className = "ok-line";
    line.textContent = text;
    fbOk.appendChild(line);
  }

  // Sends one piece of feedback; on success, "saved, will be recorded" (202) or "already
  // recorded" (409) the control is locked. A 503 is sent again after its Retry-After, a few
  // times, saying so; then its message is shown and the control unlocked.
  async function sendFeedback(kind, value, lock, thanks, saved) {
    if (!current) return;
    const pid = current.prediction_id;
    fbError.textContent = "";
    const body = { prediction_id: pid, feedback_type: kind };
    if (value !== undefined) body.feedback_value = value;
    lock(true);
    for (let attempt = 1; ; attempt++) {
      const r = await api("/api/feedback", body);
      if (!current || current.prediction_id !== pid) return;  // a new estimate replaced this one
      if (r.status === 202) { fbError.textContent = ""; addThanks(saved); return true; }
      if (r.ok) { fbError.textContent = ""; addThanks(thanks); return true; }
      if (r.status === 503 && attempt < FEEDBACK_TRIES) {
        const wait = retryDelay(r.retryAfter);
        fbError.textContent = `Your feedback couldn't be saved yet: the estimator is busy. ` +
          `Trying again in ${wait} s (try ${attempt + 1} of ${FEEDBACK_TRIES}).`;
        await sleep(wait);
        if (!current || current.prediction_id !== pid) return;
        continue;
      }
      fbError.textContent = r.message;
      if (r.status !== 409) lock(false);
      return false;
    }
  }

  $("rating-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const chosen = starInputs.find((i) => i.checked);
    if (!chosen) { fbError.textContent = "Choose 1 to 5 stars first."; starInputs[0].focus(); return; }
    const n = Number(chosen.value);
    await sendFeedback("rating", n, setStars, `Thanks — your rating was recorded (${n} of 5 stars).`,
      `Thanks — your rating (${n} of 5 stars) was saved and will be recorded shortly.`);
  });

  for (const btn of quickBtns) {
    btn.addEventListener("click", async () => {
      const kind = btn.dataset.kind, label = btn.textContent.trim().toLowerCase();
      const ok = await sendFeedback(kind, undefined, setQuick, `Thanks — noted that the estimate was ${label}.`,
        `Thanks — saved that the estimate was ${label}; it will be recorded shortly.`);
      if (ok) btn.setAttribute("aria-pressed", "true");
    });
  }

  $("actual-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const raw = actualInput.value.trim(), n = Number(raw);
    if (raw === "" || !Number.isFinite(n) || n <= 0) {
      fbError.textContent = "Enter the actual price in lakhs as a positive number (e.g. 75 for ₹ 75,00,000).";
      actualInput.setAttribute("aria-invalid", "true");
      actualInput.focus();
      return;
    }
    actualInput.removeAttribute("aria-invalid");
    await sendFeedback("actual_price", n, setActual, `Thanks — the actual price of ${formatLakhs(n)} (${formatRupees(n)}) was recorded.`,
      `Thanks — the actual price of ${formatLakhs(n)} (${formatRupees(n)}) was saved and will be recorded shortly.`);
  });

  loadLocations();
}

if (typeof document !== "undefined") {
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", initPage);
  else initPage();
}

if (typeof module !== "undefined") module.exports = { formatRupees, formatLakhs };
