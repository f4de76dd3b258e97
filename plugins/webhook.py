"""POSTs every accepted feedback event (the ``events`` export shape, JSON) to ``webhook_url`` in the background.

Delivery is one event at a time in commit order from a bounded queue (``webhook_queue_max``; beyond it events are
dropped for the webhook and counted in ``alignd_sink_dropped_total{plugin="webhook"}``). A transport error, 408,
425, 429 or 5xx is retried ``webhook_retries`` times with exponential backoff (honouring ``Retry-After``); an event
still undelivered is logged and counted in ``alignd_sink_failures_total{plugin="webhook"}``. With
``webhook_secret`` set, each attempt carries ``X-Alignd-Timestamp`` (Unix seconds) and ``X-Alignd-Signature-V1``, the
HMAC-SHA256 of ``"<timestamp>." + body``: the receiver can check that it came from this server, unaltered, and refuse
a replay by its age (:func:`alignd.clients.webhooks.verify`). ``webhook_legacy_signature`` adds the earlier releases'
``X-Alignd-Signature: sha256=<HMAC of the body>`` for receivers not yet moved. Off unless ``webhook_url`` is set.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time

import httpx
import msgspec

from alignd import CompletionRecord, Feedback, PluginContext, Signal, feedback_event, hookimpl
from alignd.clients.webhooks import EVENT_HEADER, LEGACY_SIGNATURE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from alignd.metrics import Metrics

NAME = "webhook"
_MAX_BACKOFF_S = 60.0
_RETRYABLE = {408, 425, 429}

log = logging.getLogger(__name__)


def legacy_signature(secret: str, body: bytes) -> str:
    """The earlier releases' signature header value: the body alone, so it cannot tell a replay."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signed_headers(secret: str, body: bytes, *, legacy: bool, now: float | None = None) -> dict[str, str]:
    """The signature headers of one delivery attempt."""
    timestamp = int(time.time() if now is None else now)
    headers = {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, body, timestamp)}
    if legacy:
        headers[LEGACY_SIGNATURE_HEADER] = legacy_signature(secret, body)
    return headers


class WebhookSender:
    """A bounded queue of event bodies and one task delivering them with retries."""

    def __init__(self, url: str, *, secret: str | None, timeout_s: float, retries: int, backoff_s: float,
                 queue_max: int, metrics: Metrics, legacy_signature: bool = False) -> None:
        self.url = url
        self.secret = secret
        self.legacy_signature = legacy_signature
        self.retries = retries
        self.backoff_s = backoff_s
        self.metrics = metrics
        self.queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(queue_max)
        self.client = httpx.AsyncClient(timeout=timeout_s, headers={"user-agent": "alignd-webhook"})
        self.delivered = 0
        self.task = asyncio.get_running_loop().create_task(self._run(), name="alignd-webhook")

    def enqueue(self, event_id: str, body: bytes) -> None:
        try:
            self.queue.put_nowait((event_id, body))
        except asyncio.QueueFull:
            self.metrics.sink_dropped.labels(NAME).inc()
            log.warning("webhook queue full (%d): event %s not sent (it stays stored)", self.queue.maxsize, event_id)

    async def _run(self) -> None:
        while True:
            event_id, body = await self.queue.get()
            try:
                await self._deliver(event_id, body)
            finally:
                self.queue.task_done()

    async def _deliver(self, event_id: str, body: bytes) -> None:
        headers = {"content-type": "application/json", EVENT_HEADER: event_id}
        problem = ""
        for attempt in range(self.retries + 1):
            delay = min(_MAX_BACKOFF_S, self.backoff_s * 2**attempt)
            if self.secret:  # signed per attempt: a retry after a long backoff still carries a fresh timestamp
                headers.update(signed_headers(self.secret, body, legacy=self.legacy_signature))
            try:
                response = await self.client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 300:
                    self.delivered += 1
                    return
                problem = f"HTTP {response.status_code}"
                if response.status_code < 500 and response.status_code not in _RETRYABLE:
                    break  # the receiver refuses this event: retrying will not help
                if (after := response.headers.get("retry-after", "")).isdigit():
                    delay = min(_MAX_BACKOFF_S, max(delay, float(after)))
            if attempt < self.retries:
                await asyncio.sleep(delay)
        self.metrics.sink_failures.labels(NAME).inc()
        log.error("webhook: event %s not delivered to %s (%s); it stays stored", event_id, self.url, problem)

    async def close(self, grace_s: float) -> None:
        """Deliver what is queued for up to ``grace_s`` seconds, then stop."""
        try:
            await asyncio.wait_for(self.queue.join(), grace_s)
        except TimeoutError:
            log.warning("webhook: %d event(s) not delivered at shutdown", self.queue.qsize())
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.aclose()


@hookimpl
def startup(context: PluginContext) -> None:
    config = context.settings.plugins
    if config.webhook_url:
        if not config.webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"webhook_url must be an http(s) URL, got {config.webhook_url!r}")
        context.state[NAME] = WebhookSender(config.webhook_url, secret=config.webhook_secret,
                                            timeout_s=config.webhook_timeout_s, retries=config.webhook_retries,
                                            backoff_s=config.webhook_backoff_s, queue_max=config.webhook_queue_max,
                                            metrics=context.metrics,
                                            legacy_signature=config.webhook_legacy_signature)


@hookimpl
async def on_feedback(feedback: Feedback, completion: CompletionRecord, signal: Signal,
                      context: PluginContext) -> None:
    sender: WebhookSender | None = context.state.get(NAME)
    if sender is not None:
        sender.enqueue(feedback.id, msgspec.json.encode(feedback_event(feedback, completion, signal)))


@hookimpl
async def shutdown(context: PluginContext) -> None:
    sender: WebhookSender | None = context.state.pop(NAME, None)
    if sender is not None:
        await sender.close(context.settings.plugins.webhook_timeout_s)
