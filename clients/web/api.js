// The HTTP side shared by the chat page and the dashboard: requests with a bearer key, OpenAI-shaped errors turned
// into plain sentences, and a server-sent-events reader for streamed chat completions.

/** An HTTP failure, with `plain` = {text, detail} for people and the server's `error` object for code. */
export class ApiError extends Error {
  constructor(status, error, plain) {
    super(plain.text);
    this.name = "ApiError";
    this.status = status;
    this.error = error || {};
    this.code = this.error.code || null;
    this.plain = plain;
  }
}

/** A sentence a person can act on, for an HTTP status (0: no answer at all) and the server's error object. */
export function plainError(status, error, retryAfter) {
  const message = (error && error.message) || "";
  const code = error && error.code;
  let text;
  if (status === 0) {
    text = "Could not reach the server. Check that alignd is running and that this computer is online.";
  } else if (status === 401) {
    text = "This server needs a key, and the one sent was missing or not accepted.";
  } else if (status === 403) {
    text = "The key you gave is not allowed to do this.";
  } else if (status === 404) {
    text = "The server does not know what was asked for.";
  } else if (status === 409) {
    text = "That conflicts with something already done.";
  } else if (status === 413) {
    text = "That is too long for the server to accept.";
  } else if (status === 429) {
    const wait = retryAfter ? ` Wait ${Math.ceil(Number(retryAfter))} seconds and try again.` : " Wait a moment and try again.";
    text = "Too many requests." + wait;
  } else if (code === "context_length_exceeded") {
    text = error.param === "messages"
      ? "The conversation is too long for the model. Start a new conversation."
      : "The longest reply asked for does not fit in what is left of the model's context. Lower it in Settings, or start a new conversation.";
  } else if (status === 400 || status === 422) {
    text = "The server could not accept that request.";
  } else if (status === 503) {
    text = "The server is not ready yet (the model may still be loading). Try again in a few seconds.";
  } else if (status >= 500) {
    text = "Something went wrong on the server. Try again; if it keeps happening, tell whoever runs it.";
  } else {
    text = `The server answered with an unexpected status (${status}).`;
  }
  // The server's own message says what exactly; shown under the sentence, never as raw JSON.
  const detail = message && !/^internal server error\.?$/i.test(message) ? message : "";
  return { text, detail };
}

/**
 * fetch() that resolves with the Response when it is 2xx and throws an ApiError otherwise (also when the server
 * cannot be reached). An aborted request rethrows the AbortError.
 */
export async function request(path, { method = "GET", body, key, signal } = {}) {
  const headers = { accept: "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (key) headers.authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, null, plainError(0));
  }
  if (!response.ok) {
    let error = null;
    try {
      error = (await response.json()).error || null;
    } catch {
      // not JSON (a proxy's HTML page): the status alone has to do
    }
    throw new ApiError(response.status, error, plainError(response.status, error, response.headers.get("retry-after")));
  }
  return response;
}

/** request() and the decoded JSON body. */
export async function requestJSON(path, options) {
  const response = await request(path, options);
  return response.status === 204 ? null : response.json();
}

/** The events of a `text/event-stream` response, as parsed JSON, until `data: [DONE]`. */
export async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let boundary;
      while ((boundary = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (!data) continue; // a comment or keep-alive
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(500, event.error, plainError(500, event.error));
        yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
  throw new ApiError(0, null, { text: "The reply was cut off: the connection closed before the end.", detail: "" });
}

/** localStorage (or sessionStorage) holding JSON, quietly doing without when storage is blocked or full. */
export function jsonStore(storage) {
  return {
    get(key, fallback) {
      try {
        const raw = storage.getItem(key);
        return raw === null ? fallback : JSON.parse(raw);
      } catch {
        return fallback;
      }
    },
    set(key, value) {
      try {
        storage.setItem(key, JSON.stringify(value));
        return true;
      } catch {
        return false;
      }
    },
    remove(key) {
      try {
        storage.removeItem(key);
      } catch {
        // nothing to do
      }
    },
  };
}

/** An element with attributes and children (strings become text nodes: nothing is parsed as HTML). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "className") el.className = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** An error shown in plain words: the sentence, then what the server said. */
export function errorBox(plain, ...extra) {
  return h("div", { className: "error-box", role: "alert" },
    h("strong", {}, plain.text),
    plain.detail ? h("span", { className: "detail" }, `The server said: ${plain.detail}`) : null,
    ...extra);
}
