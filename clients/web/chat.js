// The alignd web chat: streamed replies, conversations kept in this browser, and feedback on every reply
// (thumbs with reasons, a comment and an optional rating; compare two replies; rank several; edit a reply).
import { ApiError, errorBox, h, jsonStore, readEvents, request, requestJSON } from "./api.js";

const local = jsonStore(window.localStorage);
const KEYS = { apiKey: "alignd.apiKey", conversations: "alignd.conversations", current: "alignd.current",
  settings: "alignd.settings" };
const MAX_CONVERSATIONS = 50; // localStorage holds ~5 MB; old conversations go first
const DEFAULTS = { mode: "chat", model: "alignd", temperature: 0.7, maxTokens: 128, rankN: 3 };
const COMPARE_MIN_TEMPERATURE = 0.7; // two samples at a low temperature are nearly the same reply
const TAGS = {
  up: ["helpful", "accurate", "clear", "friendly", "concise"],
  down: ["wrong", "unhelpful", "off-topic", "too long", "unclear", "rude"],
};

const $ = (id) => document.getElementById(id);
const ui = {
  transcript: $("transcript"), composer: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  conversations: $("conversations"), history: $("history"), status: $("status"),
};

const state = {
  settings: { ...DEFAULTS, ...local.get(KEYS.settings, {}) },
  conversations: local.get(KEYS.conversations, []),
  currentId: local.get(KEYS.current, null),
  streaming: null, // the AbortController of the reply being written
  turnEls: new Map(), // turn id -> its element in the transcript
};

// --- conversations in localStorage -------------------------------------------------------------------------------

const uid = () => (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`);

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function ensureConversation() {
  let conv = current();
  if (!conv) {
    conv = { id: uid(), title: "", created: Date.now(), updated: Date.now(), turns: [] };
    state.conversations.unshift(conv);
    state.currentId = conv.id;
  }
  return conv;
}

function save() {
  state.conversations.sort((a, b) => b.updated - a.updated);
  state.conversations.length = Math.min(state.conversations.length, MAX_CONVERSATIONS);
  while (!local.set(KEYS.conversations, state.conversations) && state.conversations.length > 1) {
    state.conversations.pop(); // storage full: drop the oldest and try again
  }
  local.set(KEYS.current, state.currentId);
}

/** The messages sent with the next request: each answered turn's user message and the reply that continues it. */
function historyMessages(conv) {
  const messages = [];
  for (const turn of conv.turns) {
    if (!turn.completionId || turn.status === "error") continue;
    messages.push({ role: "user", content: turn.user });
    messages.push({ role: "assistant", content: replyText(turn, turn.selected) });
  }
  return messages;
}

function replyText(turn, index) {
  return turn.edits[index] ?? turn.choices[index].text;
}

// --- rendering -------------------------------------------------------------------------------------------------

function announce(text) {
  ui.status.textContent = text;
}

function renderConversationList() {
  ui.conversations.replaceChildren(...state.conversations.map((conv) => h("li", {},
    h("button", { type: "button", className: "open-conv", "aria-current": conv.id === state.currentId ? "true" : "false",
      title: conv.title || "New conversation", onclick: () => openConversation(conv.id) },
    conv.title || "New conversation"),
    h("button", { type: "button", className: "delete-conv", "aria-label": `Delete conversation: ${conv.title || "new"}`,
      title: "Delete", onclick: () => deleteConversation(conv.id) }, "×"))));
}

function renderTranscript() {
  const conv = current();
  state.turnEls.clear();
  if (!conv || conv.turns.length === 0) {
    ui.transcript.replaceChildren(h("div", { className: "empty-state" },
      h("p", {}, "Ask anything. Rate each reply with thumbs up or down so the model can learn what you like."),
      h("p", {}, "Compare mode shows two replies side by side; rank mode shows several to put in order. Press ? for shortcuts.")));
    return;
  }
  ui.transcript.replaceChildren(...conv.turns.map((turn) => {
    const el = renderTurn(turn);
    state.turnEls.set(turn.id, el);
    return el;
  }));
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function rerender(turn) {
  const old = state.turnEls.get(turn.id);
  const el = renderTurn(turn);
  state.turnEls.set(turn.id, el);
  if (old) old.replaceWith(el);
  else ui.transcript.append(el);
  return el;
}

function renderTurn(turn) {
  const el = h("article", { className: `turn mode-${turn.mode}`, "data-turn": turn.id,
    "data-completion": turn.completionId, "data-status": turn.status },
    h("div", { className: "user-msg" }, turn.user));
  if (turn.status === "error") {
    el.append(errorBox(turn.error, h("div", { className: "row" },
      h("button", { type: "button", onclick: () => retry(turn) }, "Try again"))));
    return el;
  }
  if (turn.mode === "rank") el.append(renderRank(turn));
  else {
    const grid = h("div", { className: `replies ${turn.mode === "compare" ? "compare" : ""}` });
    turn.choices.forEach((_, i) => grid.append(renderReply(turn, i)));
    el.append(grid);
    if (turn.mode === "compare") el.append(renderPickBar(turn));
  }
  if (turn.status === "stopped") el.append(h("p", { className: "rank-hint" }, "Stopped before the end."));
  return el;
}

function choiceLabel(turn, i) {
  if (turn.mode === "compare") return i === 0 ? "Left" : "Right";
  if (turn.mode === "rank") return `Reply ${String.fromCharCode(65 + i)}`;
  return "Reply";
}

function renderReply(turn, i, { tag = "div", extraHead = [] } = {}) {
  const done = turn.status === "done" || turn.status === "stopped";
  const classes = ["reply"];
  if (turn.mode === "compare" && turn.feedback.pairwise !== undefined) {
    const w = turn.feedback.pairwise;
    if (w === i) classes.push("chosen");
    else if (typeof w === "number" || w === "both_bad") classes.push("rejected");
  }
  const text = h("div", { className: `reply-text${turn.status === "streaming" ? " streaming" : ""}`,
    "data-choice-text": String(i) }, replyText(turn, i));
  const head = h("div", { className: "reply-head" },
    h("span", {}, choiceLabel(turn, i)),
    turn.fingerprint ? h("span", { className: "badge policy", title: "The policy version that wrote this reply" },
      turn.fingerprint) : null,
    turn.edits[i] !== undefined ? h("span", { className: "badge" }, "edited") : null,
    turn.choices[i].finish === "length" ? h("span", { className: "badge", title: "Reached the length limit" }, "cut off") : null,
    ...extraHead);
  const card = h(tag, { className: classes.join(" "), "data-choice": String(i) }, head, text);
  if (done && turn.completionId) card.append(renderActions(turn, i, card));
  return card;
}

const SVG_NS = "http://www.w3.org/2000/svg";

/** A thumb drawn in SVG (emoji fonts are missing on many desktops); "down" is the same hand turned over. */
function thumbIcon(value) {
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("width", "20");
  svg.setAttribute("height", "20");
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("fill", "currentColor");
  const g = document.createElementNS(SVG_NS, "g");
  if (value === "down") g.setAttribute("transform", "rotate(180 12 12)");
  const cuff = document.createElementNS(SVG_NS, "rect");
  for (const [k, v] of Object.entries({ x: 2, y: 10, width: 4, height: 11, rx: 1 })) cuff.setAttribute(k, String(v));
  const hand = document.createElementNS(SVG_NS, "path");
  hand.setAttribute("d", "M8 10.5 12.5 3.2C13.3 2.2 15 2.8 14.8 4.3L14.2 9H19.5C20.9 9 21.9 10.3 21.5 11.7L19.6 19.3"
    + "C19.3 20.3 18.4 21 17.4 21H8Z");
  g.append(cuff, hand);
  svg.append(g);
  return svg;
}

function renderActions(turn, i, card) {
  const given = turn.feedback.thumbs[i];
  const thumb = (value, label) => h("button", {
    type: "button", className: "thumb", "aria-pressed": given === value ? "true" : "false",
    "aria-label": `${label} (${choiceLabel(turn, i)})`, title: label, "data-thumb": value,
    onclick: () => openFeedbackForm(turn, i, value, card),
  }, thumbIcon(value));
  const rating = turn.feedback.rating[i];
  return h("div", { className: "actions" },
    thumb("up", "Good reply"),
    thumb("down", "Bad reply"),
    h("button", { type: "button", className: "edit", "aria-label": `Edit (${choiceLabel(turn, i)})`,
      onclick: () => openEditor(turn, i, card) }, "Edit"),
    given ? h("span", { className: "thanks" }, `Thanks — feedback saved${rating ? ` (rated ${rating}/10)` : ""}.`) : null);
}

function closePanels(card) {
  card.querySelectorAll(".fb-panel, .edit-panel").forEach((p) => p.remove());
}

function openFeedbackForm(turn, i, value, card) {
  closePanels(card);
  const tags = TAGS[value].map((tag) => h("label", { className: "tag" },
    h("input", { type: "checkbox", name: "tag", value: tag }), tag));
  const comment = h("textarea", { rows: "2", name: "comment", maxlength: "10000",
    placeholder: "What was good or bad? (optional)" });
  const rating = h("select", { name: "rating" }, h("option", { value: "" }, "—"),
    ...Array.from({ length: 10 }, (_, k) => h("option", { value: String(k + 1) }, String(k + 1))));
  const error = h("p", { className: "inline-error", role: "alert" });
  const sendButton = h("button", { type: "submit", className: "primary" }, "Send feedback");
  const form = h("form", { className: "fb-panel", "aria-label": value === "up" ? "Good reply: details" : "Bad reply: details" },
    h("strong", {}, value === "up" ? "Good reply — anything to add? (optional)" : "Bad reply — what was wrong? (optional)"),
    h("fieldset", {}, h("legend", {}, "Reasons"), ...tags),
    h("label", {}, "Comment", comment),
    h("label", { className: "row" }, "Rating, 1–10 (optional)", rating),
    error,
    h("div", { className: "row" }, sendButton,
      h("button", { type: "button", onclick: () => form.remove() }, "Cancel")));
  form.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { e.stopPropagation(); form.remove(); card.querySelector(`[data-thumb="${value}"]`)?.focus(); }
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    sendButton.disabled = true;
    error.textContent = "";
    const chosenTags = [...form.querySelectorAll("input[name=tag]:checked")].map((c) => c.value);
    const body = { kind: "thumbs", choice: i, value, tags: chosenTags };
    if (comment.value.trim()) body.comment = comment.value.trim();
    try {
      await sendFeedback(turn, body);
      turn.feedback.thumbs[i] = value;
      if (rating.value) {
        await sendFeedback(turn, { kind: "rating", choice: i, score: Number(rating.value) });
        turn.feedback.rating[i] = Number(rating.value);
      }
      save();
      announce("Feedback saved.");
      const el = rerender(turn);
      el.querySelector(`[data-choice="${i}"] [data-thumb="${value}"]`)?.focus();
    } catch (err) {
      sendButton.disabled = false;
      showInlineError(error, err);
    }
  });
  (card.querySelector(".rank-body") || card).append(form);
  sendButton.focus();
}

function openEditor(turn, i, card) {
  closePanels(card);
  const original = replyText(turn, i);
  const area = h("textarea", { rows: "5", "aria-label": "Corrected reply" });
  area.value = original;
  const error = h("p", { className: "inline-error", role: "alert" });
  const saveButton = h("button", { type: "submit", className: "primary" }, "Save edit");
  const form = h("form", { className: "edit-panel", "aria-label": "Edit the reply" },
    h("strong", {}, "Write the reply as it should have been:"), area, error,
    h("div", { className: "row" }, saveButton, h("button", { type: "button", onclick: () => form.remove() }, "Cancel")));
  form.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { e.stopPropagation(); form.remove(); card.querySelector(".edit")?.focus(); }
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = area.value;
    if (!text.trim() || text.trim() === original.trim()) {
      error.textContent = "Change the reply first, or press Cancel.";
      return;
    }
    saveButton.disabled = true;
    try {
      await sendFeedback(turn, { kind: "edit", choice: i, text });
      turn.edits[i] = text;
      turn.feedback.edit[i] = true;
      save();
      announce("Edit saved.");
      rerender(turn).querySelector(`[data-choice="${i}"] .edit`)?.focus();
    } catch (err) {
      saveButton.disabled = false;
      showInlineError(error, err);
    }
  });
  (card.querySelector(".rank-body") || card).append(form);
  area.focus();
}

function showInlineError(el, err) {
  const plain = err.plain || { text: String(err.message || err), detail: "" };
  el.textContent = plain.detail ? `${plain.text} The server said: ${plain.detail}` : plain.text;
}

// --- compare -----------------------------------------------------------------------------------------------------

const PICKS = [
  { winner: 0, label: "← Left is better", key: "1" },
  { winner: "tie", label: "Tie", key: "T" },
  { winner: "both_bad", label: "Both bad", key: "B" },
  { winner: 1, label: "Right is better →", key: "2" },
];

function pickDescription(winner) {
  return { 0: "You preferred the left reply.", 1: "You preferred the right reply.", tie: "You called it a tie.",
    both_bad: "You marked both replies as bad." }[winner];
}

function renderPickBar(turn) {
  if (turn.feedback.pairwise !== undefined) {
    return h("p", { className: "pick-result", role: "status" }, pickDescription(turn.feedback.pairwise));
  }
  const error = h("p", { className: "inline-error", role: "alert" });
  const ready = turn.status === "done" && turn.completionId;
  return h("div", { className: "pick", "data-pick": "" },
    h("div", { className: "pick-bar", role: "group", "aria-label": "Which reply is better?" },
      ...PICKS.map((p) => h("button", { type: "button", disabled: !ready, "data-winner": String(p.winner),
        "aria-keyshortcuts": p.key, onclick: () => pick(turn, p.winner, error) }, `${p.label} (${p.key})`))),
    error);
}

async function pick(turn, winner, errorEl) {
  if (turn.feedback.pairwise !== undefined || turn.picking) return;
  turn.picking = true;
  try {
    await sendFeedback(turn, { kind: "pairwise", winner });
    turn.feedback.pairwise = winner;
    turn.selected = typeof winner === "number" ? winner : 0; // the conversation goes on with the preferred reply
    save();
    announce(pickDescription(winner));
    rerender(turn);
    ui.prompt.focus();
  } catch (err) {
    showInlineError(errorEl, err);
  } finally {
    turn.picking = false;
  }
}

function pendingCompare() {
  const conv = current();
  const last = conv && conv.turns[conv.turns.length - 1];
  return last && last.mode === "compare" && last.status === "done" && last.feedback.pairwise === undefined ? last : null;
}

// --- rank ----------------------------------------------------------------------------------------------------------

function renderRank(turn) {
  const ranked = turn.feedback.ranking !== undefined;
  const done = turn.status === "done" && turn.completionId;
  const list = h("ol", { className: "rank-list", "aria-label": "Replies, best first" });
  turn.order.forEach((choice, position) => {
    const pos = h("span", { className: "rank-pos", "aria-hidden": "true" }, String(position + 1));
    const card = renderReply(turn, choice, { tag: "li" });
    card.prepend(pos);
    // The reply's own head and text go into a body column next to the position.
    const body = h("div", { className: "rank-body" }, ...[...card.childNodes].filter((n) => n !== pos));
    card.append(body);
    card.setAttribute("aria-label", `Place ${position + 1}: ${choiceLabel(turn, choice)}`);
    if (done && !ranked) {
      card.tabIndex = 0;
      card.draggable = true;
      card.addEventListener("keydown", (e) => rankKey(e, turn, choice));
      card.addEventListener("dragstart", (e) => {
        e.dataTransfer.setData("text/plain", String(choice));
        e.dataTransfer.effectAllowed = "move";
        card.classList.add("dragging");
      });
      card.addEventListener("dragend", () => card.classList.remove("dragging"));
      card.addEventListener("dragover", (e) => { e.preventDefault(); card.classList.add("drop-target"); });
      card.addEventListener("dragleave", () => card.classList.remove("drop-target"));
      card.addEventListener("drop", (e) => {
        e.preventDefault();
        card.classList.remove("drop-target");
        const dragged = Number(e.dataTransfer.getData("text/plain"));
        // Dropped on a reply: the dragged one takes that reply's place.
        moveTo(turn, dragged, turn.order.indexOf(choice));
      });
    }
    list.append(card);
  });
  const wrap = h("div", { className: "rank" }, list);
  if (ranked) {
    wrap.append(h("p", { className: "pick-result", role: "status" }, "Ranking saved: thank you."));
  } else if (done) {
    const error = h("p", { className: "inline-error", role: "alert" });
    wrap.append(
      h("p", { className: "rank-hint" }, "Put the replies in order, best first: drag them, or focus one and press its new place (1–",
        String(turn.order.length), "). Then submit."),
      h("div", { className: "row" }, h("button", { type: "button", className: "primary submit-ranking",
        onclick: () => submitRanking(turn, error) }, "Submit ranking"), error));
  }
  return wrap;
}

function moveTo(turn, choice, position, focus = false) {
  const order = turn.order.filter((c) => c !== choice);
  order.splice(Math.max(0, Math.min(position, order.length)), 0, choice);
  turn.order = order;
  save();
  const el = rerender(turn);
  announce(`${choiceLabel(turn, choice)} is now in place ${turn.order.indexOf(choice) + 1}.`);
  if (focus) el.querySelector(`li[data-choice="${choice}"]`)?.focus();
}

function rankKey(e, turn, choice) {
  if (e.target !== e.currentTarget) return; // keys typed in a feedback form inside the card
  const position = turn.order.indexOf(choice);
  if (/^[1-9]$/.test(e.key) && !e.altKey && !e.ctrlKey && !e.metaKey) {
    const to = Number(e.key) - 1;
    if (to < turn.order.length) moveTo(turn, choice, to, true);
    e.preventDefault();
    e.stopPropagation();
  } else if ((e.key === "ArrowUp" || e.key === "ArrowDown") && e.altKey) {
    moveTo(turn, choice, position + (e.key === "ArrowUp" ? -1 : 1), true);
    e.preventDefault();
  } else if (e.key === "ArrowUp" || e.key === "ArrowDown") {
    const next = turn.order[position + (e.key === "ArrowUp" ? -1 : 1)];
    if (next !== undefined) state.turnEls.get(turn.id).querySelector(`li[data-choice="${next}"]`)?.focus();
    e.preventDefault();
  } else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    state.turnEls.get(turn.id).querySelector(".submit-ranking")?.click();
    e.preventDefault();
  }
}

async function submitRanking(turn, errorEl) {
  if (turn.feedback.ranking !== undefined) return;
  const ranking = [...turn.order];
  try {
    await sendFeedback(turn, { kind: "ranking", ranking });
    turn.feedback.ranking = ranking;
    turn.selected = ranking[0];
    save();
    announce("Ranking saved.");
    rerender(turn);
    ui.prompt.focus();
  } catch (err) {
    showInlineError(errorEl, err);
  }
}

// --- requests ----------------------------------------------------------------------------------------------------

function apiKey() {
  return local.get(KEYS.apiKey, "") || "";
}

/** Run `call`; when the server answers 401, ask for a key (the dialog says why) and run it again. */
async function withKey(call) {
  for (;;) {
    try {
      return await call(apiKey());
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
      const reason = apiKey()
        ? `That key was not accepted (${err.plain.detail || "invalid key"}). Enter a valid API key for this server.`
        : "This server needs an API key. Enter it to go on; it is kept in this browser only.";
      if (!(await askForKey(reason))) throw err;
    }
  }
}

function sendFeedback(turn, fields) {
  // One idempotency key per action: a retry after a lost answer cannot store the same feedback twice.
  const body = { completion_id: turn.completionId, idempotency_key: uid(), ...fields };
  return withKey((key) => requestJSON("v1/feedback", { method: "POST", body, key }));
}

async function send(text) {
  if (state.streaming || !text.trim()) return;
  const conv = ensureConversation();
  const mode = state.settings.mode;
  const n = mode === "compare" ? 2 : mode === "rank" ? state.settings.rankN : 1;
  const turn = {
    id: uid(), user: text, mode, status: "streaming", completionId: null, fingerprint: null,
    choices: Array.from({ length: n }, () => ({ text: "", finish: null })),
    order: Array.from({ length: n }, (_, i) => i), selected: 0, edits: {},
    feedback: { thumbs: {}, rating: {}, edit: {} },
  };
  const messages = [...historyMessages(conv), { role: "user", content: text }];
  conv.turns.push(turn);
  conv.title = conv.title || text.slice(0, 80);
  conv.updated = Date.now();
  save();
  if (conv.turns.length === 1) renderTranscript();
  else rerender(turn);
  renderConversationList();
  ui.prompt.value = "";
  const temperature = mode === "chat" ? state.settings.temperature
    : Math.max(state.settings.temperature, COMPARE_MIN_TEMPERATURE);
  const body = { model: state.settings.model || "alignd", messages, n, temperature,
    max_tokens: state.settings.maxTokens, stream: true };
  const controller = new AbortController();
  setStreaming(controller);
  try {
    const response = await withKey((key) => request("v1/chat/completions",
      { method: "POST", body, key, signal: controller.signal }));
    for await (const chunk of readEvents(response)) {
      turn.completionId = chunk.id;
      if (chunk.system_fingerprint && turn.fingerprint !== chunk.system_fingerprint) {
        turn.fingerprint = chunk.system_fingerprint;
        rerender(turn);
      }
      for (const c of chunk.choices || []) {
        const choice = turn.choices[c.index];
        if (!choice) continue;
        if (c.delta && c.delta.content) choice.text += c.delta.content;
        if (c.finish_reason) choice.finish = c.finish_reason;
      }
      paint(turn);
    }
    turn.status = "done";
    announce("Reply finished.");
  } catch (err) {
    if (err.name === "AbortError") {
      turn.status = "stopped";
      announce("Stopped.");
    } else {
      turn.status = "error";
      turn.error = err.plain || { text: "Something went wrong while reading the reply.", detail: String(err.message || err) };
      announce(turn.error.text);
    }
  } finally {
    setStreaming(null);
  }
  conv.updated = Date.now();
  save();
  const el = rerender(turn);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  // Put the keyboard where the next step is: the choice to make, or the message box.
  if (turn.status === "done" && mode === "compare") el.querySelector(".pick-bar button")?.focus();
  else if (turn.status === "done" && mode === "rank") el.querySelector(".rank-list li")?.focus();
  else ui.prompt.focus();
}

let paintQueued = null;
function paint(turn) {
  // Repaint the streamed text once per frame, not once per token.
  if (paintQueued) return;
  paintQueued = requestAnimationFrame(() => {
    paintQueued = null;
    const el = state.turnEls.get(turn.id);
    if (!el) return;
    const nearBottom = ui.transcript.scrollHeight - ui.transcript.scrollTop - ui.transcript.clientHeight < 80;
    turn.choices.forEach((c, i) => {
      const node = el.querySelector(`[data-choice-text="${i}"]`);
      if (node && node.textContent !== c.text) node.textContent = c.text;
    });
    if (nearBottom) ui.transcript.scrollTop = ui.transcript.scrollHeight;
  });
}

function setStreaming(controller) {
  state.streaming = controller;
  ui.stop.hidden = !controller;
  ui.send.disabled = Boolean(controller);
}

function retry(turn) {
  const conv = current();
  conv.turns = conv.turns.filter((t) => t !== turn);
  state.turnEls.get(turn.id)?.remove();
  save();
  send(turn.user);
}

// --- dialogs -----------------------------------------------------------------------------------------------------

let keyResolve = null;

/** Show the key dialog; resolves true when a key was saved, false when cancelled. */
function askForKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason || "Give the API key for this server. It is kept in this browser only.";
  $("api-key").value = apiKey();
  if (keyResolve) keyResolve(false);
  return new Promise((resolve) => {
    keyResolve = resolve;
    if (!dialog.open) dialog.showModal();
    $("api-key").focus();
    $("api-key").select();
  });
}

function closeKeyDialog(saved) {
  const dialog = $("key-dialog");
  if (dialog.open) dialog.close();
  if (keyResolve) {
    const resolve = keyResolve;
    keyResolve = null;
    resolve(saved);
  }
}

function openSettings() {
  const s = state.settings;
  $("set-temperature").value = String(s.temperature);
  $("set-max-tokens").value = String(s.maxTokens);
  $("set-rank-n").value = String(s.rankN);
  $("settings-error").textContent = "";
  $("settings").showModal();
  // The models list needs the engine and maybe a key; the dialog works without it.
  withKey((key) => requestJSON("v1/models", { key })).then((list) => {
    const select = $("set-model");
    const names = list.data.map((m) => m.id);
    if (!names.includes(s.model)) names.push(s.model);
    select.replaceChildren(...names.map((name) => h("option", { value: name }, name.includes("@")
      ? `${name} (policy version ${name.split("@")[1]} only)` : `${name} (the promoted policy)`)));
    select.value = s.model;
  }).catch(() => { $("set-model").value = "alignd"; });
  $("set-model").value = s.model;
}

function saveSettings() {
  const temperature = Number($("set-temperature").value);
  const maxTokens = Number($("set-max-tokens").value);
  const rankN = Number($("set-rank-n").value);
  const problems = [];
  if (!(temperature >= 0 && temperature <= 2)) problems.push("Temperature must be between 0 and 2.");
  if (!(Number.isInteger(maxTokens) && maxTokens >= 1)) problems.push("The longest reply must be a whole number of tokens, 1 or more.");
  if (!(Number.isInteger(rankN) && rankN >= 2 && rankN <= 6)) problems.push("Replies to rank must be between 2 and 6.");
  if (problems.length) {
    $("settings-error").textContent = problems.join(" ");
    return false;
  }
  Object.assign(state.settings, { temperature, maxTokens, rankN, model: $("set-model").value || "alignd" });
  local.set(KEYS.settings, state.settings);
  return true;
}

function setMode(mode) {
  state.settings.mode = mode;
  local.set(KEYS.settings, state.settings);
  const radio = document.querySelector(`input[name=mode][value="${mode}"]`);
  if (radio) radio.checked = true;
  ui.prompt.placeholder = { chat: "Message alignd…", compare: "Message alignd — you will get two replies to compare…",
    rank: `Message alignd — you will get ${state.settings.rankN} replies to rank…` }[mode];
  announce(`${mode[0].toUpperCase()}${mode.slice(1)} mode.`);
}

// --- navigation --------------------------------------------------------------------------------------------------

function openConversation(id) {
  if (state.streaming) state.streaming.abort();
  state.currentId = id;
  save();
  renderConversationList();
  renderTranscript();
  toggleHistory(false);
  ui.prompt.focus();
}

function newConversation() {
  if (state.streaming) state.streaming.abort();
  state.currentId = null;
  save();
  renderConversationList();
  renderTranscript();
  ui.prompt.value = "";
  ui.prompt.focus();
  announce("New conversation.");
}

function deleteConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = null;
  save();
  renderConversationList();
  renderTranscript();
}

function toggleHistory(open) {
  const isOpen = open ?? !ui.history.classList.contains("open");
  ui.history.classList.toggle("open", isOpen);
  $("toggle-history").setAttribute("aria-expanded", String(isOpen));
}

function isTyping(target) {
  return target instanceof HTMLElement && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
}

function onGlobalKey(e) {
  if (document.querySelector("dialog[open]")) return; // dialogs handle their own keys (Esc closes them)
  if (e.altKey && !e.ctrlKey && !e.metaKey) {
    const mode = { Digit1: "chat", Digit2: "compare", Digit3: "rank" }[e.code];
    if (mode) { setMode(mode); e.preventDefault(); return; }
    if (e.code === "KeyN") { newConversation(); e.preventDefault(); return; }
  }
  if (e.key === "Escape" && state.streaming) { state.streaming.abort(); e.preventDefault(); return; }
  if (e.key === "Escape" && ui.history.classList.contains("open")) { toggleHistory(false); $("toggle-history").focus(); return; }
  if (isTyping(e.target) || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "?") { $("help").showModal(); e.preventDefault(); return; }
  if (e.key === "/") { ui.prompt.focus(); e.preventDefault(); return; }
  const turn = pendingCompare();
  if (turn) {
    const winner = { 1: 0, ArrowLeft: 0, 2: 1, ArrowRight: 1, t: "tie", T: "tie", b: "both_bad", B: "both_bad" }[e.key];
    if (winner !== undefined) {
      const el = state.turnEls.get(turn.id);
      pick(turn, winner, el.querySelector(".pick .inline-error"));
      e.preventDefault();
    }
  }
}

function init() {
  document.querySelectorAll("input[name=mode]").forEach((radio) =>
    radio.addEventListener("change", () => setMode(radio.value)));
  setMode(state.settings.mode);
  ui.composer.addEventListener("submit", (e) => { e.preventDefault(); send(ui.prompt.value); });
  ui.prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(ui.prompt.value); }
  });
  ui.stop.addEventListener("click", () => state.streaming && state.streaming.abort());
  $("new-chat").addEventListener("click", newConversation);
  $("toggle-history").addEventListener("click", () => toggleHistory());
  $("close-history").addEventListener("click", () => { toggleHistory(false); $("toggle-history").focus(); });
  $("open-help").addEventListener("click", () => $("help").showModal());
  $("open-settings").addEventListener("click", openSettings);
  $("settings-cancel").addEventListener("click", () => $("settings").close());
  $("settings-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (saveSettings()) { $("settings").close(); setMode(state.settings.mode); }
  });
  $("open-key").addEventListener("click", () => askForKey());
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (key) local.set(KEYS.apiKey, key);
    else local.remove(KEYS.apiKey);
    closeKeyDialog(Boolean(key));
  });
  $("key-cancel").addEventListener("click", () => closeKeyDialog(false));
  $("key-forget").addEventListener("click", () => { local.remove(KEYS.apiKey); $("api-key").value = ""; closeKeyDialog(false); });
  $("key-dialog").addEventListener("cancel", () => closeKeyDialog(false)); // Esc
  document.addEventListener("keydown", onGlobalKey);
  renderConversationList();
  renderTranscript();
  ui.prompt.focus();
}

init();
