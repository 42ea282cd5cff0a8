"""Build the selector from a `Config` and serve it over gRPC: `colm-selector serve`."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from colm_server.config import Config, fingerprint
from colm_server.data.collate import Collator
from colm_server.data.shards import ShardStream, manifest_sources, unshuffled_manifests
from colm_server.model.load import attach_lora, decoder_layers, load_model, load_tokenizer, truncate_layers
from colm_server.select import Selector, build_selector
from colm_server.service.auth import TokenInterceptor, warn_if_exposed
from colm_server.service.changes import Changes
from colm_server.service.inbox import Waiting
from colm_server.service.job import Job
from colm_server.service.journal import Journal
from colm_server.service.loop import EventLoopThread, LoopClosed
from colm_server.service.metrics import SelectorMetrics
from colm_server.service.replicas import SINGLE, Leader, Replicas, follow
from colm_server.service.servicer import SelectorServicer
from colm_wire.adapter import adapter_state
from colm_wire.contract import settings
from colm_wire.proto import selector_pb2 as pb
from colm_wire.proto import selector_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Selector"].full_name
ADAPTER_FILE = "adapter.pt"
CALL_TIMEOUT = 30.0  # seconds a plain thread waits for a step of starting or stopping on the loop


class ServingConfigError(ValueError):
    """A config that loads but cannot be served here: no shards given, unreadable secrets, a bad work dir."""


@dataclass
class Engine:
    """What every selector replica loads: the model's live adapter, the collator, the selector
    and the record stream; plus the model's ``contract.settings``, which joining trainers must match."""

    adapter: dict[str, torch.Tensor]
    collator: Collator
    selector: Selector
    stream: ShardStream
    settings: dict[str, str]


def build_engine(config: Config, replicas: Replicas = SINGLE) -> Engine:
    """Load model, tokenizer, selector and shards (the same on every replica).

    First the one check that ``config`` can be served here, for every way of serving (the CLI,
    `SelectorServer`, replicas): ServingConfigError naming the key, before the model loads.
    """
    try:
        config.validate_for_serving()
        config.service.check_work_dir()
    except ValueError as e:
        raise ServingConfigError(str(e)) from None
    mc = config.model
    device, dtype = mc.resolve(torch.cuda.is_available())
    own = config.selector.scorer_adapter == "own"
    tokenizer = load_tokenizer(mc.source)
    if config.selector.scorer_model:
        check_scorer_tokenizer(config, tokenizer)  # before any model loads
    model = load_model(mc.source, dtype=getattr(torch, dtype), num_layers=mc.num_layers)
    model = attach_lora(model, r=mc.lora_r, alpha=mc.lora_alpha, dropout=mc.lora_dropout,
                        targets=mc.lora_targets, adapter=mc.adapter).eval()
    # With a scorer of its own, the trained model only holds the pushed adapter: it stays on the host.
    model = freeze(model if own else model.to(device))
    scorer = build_own_scorer(config, device, getattr(torch, dtype)) if own else model
    tc = config.tokenize
    collator = Collator(tokenizer, max_length=tc.max_length, chat_template=tc.chat_template,
                        min_prompt_fraction=tc.min_prompt_fraction)
    selector = build_selector(scorer, config.step_selector(), replicas=replicas.world > 1)
    sizes = manifest_sources(config.data.urls)
    if sizes:  # a restarted job then restores its own journaled counts over these
        selector.prime_sources(sizes)  # refuses a selector.mixture naming a source the data lacks
    elif not isinstance(config.selector.mixture, str):
        logger.warning("selector.mixture names sources that cannot be checked against the data: "
                       "data.urls names no manifest with per-source counts")
    return Engine(adapter_state(model), collator, selector, ShardStream(config.data),
                  settings(mc.source, mc.num_layers, model))


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No weight gradients: the sketches take their own, and an own adapter unfreezes its LoRA per step."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_scorer_tokenizer(config: Config, tokenizer) -> None:
    """ServingConfigError, naming both models, when ``selector.scorer_model``'s vocabulary is not
    that of ``tokenizer`` (the trained model's): its scores would be of other tokens."""
    source, trained = config.selector.scorer_model, config.model.source
    theirs = load_tokenizer(source)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ServingConfigError(
            f"selector.scorer_model {source!r} has another tokenizer than model.source {trained!r} "
            f"({len(theirs)} tokens against {len(tokenizer)}, or the same count with other ids): "
            "a scorer must read the trained model's token ids")


def build_own_scorer(config: Config, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The model the selector scores with when it carries its own LoRA (``selector.scorer_adapter:
    own``): ``selector.scorer_model``, or a copy of the trained model, with only the layers the
    early exit keeps and a new LoRA of the trained model's rank (not ``model.adapter``)."""
    mc, sc = config.model, config.selector
    source = sc.scorer_model or mc.source
    scorer = load_model(source, dtype=dtype, num_layers=None if sc.scorer_model else mc.num_layers)
    exit_after = sc.scoring().scorer_layers
    if exit_after:  # only what the early exit runs (capped at the depth, as the scorer caps it)
        truncate_layers(scorer, min(exit_after, len(decoder_layers(scorer))))
    scorer = attach_lora(scorer, r=mc.lora_r, alpha=mc.lora_alpha,
                         targets=None if sc.scorer_model else mc.lora_targets)
    return freeze(scorer.to(device).eval())


def build_job(config: Config, replicas: Replicas = SINGLE) -> tuple[Job, Collator, dict[str, str]]:
    """The engine plus journal and work dir; restores the job from the work dir if any.

    Also returns the model's ``contract.settings``, which joining trainers must match.
    """
    engine = build_engine(config, replicas)
    sc = config.service
    work = Path(sc.work_dir)
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"service.work_dir: cannot create {sc.work_dir!r} "
                         f"({e.strerror or type(e).__name__})") from None
    saved = work / ADAPTER_FILE
    if saved.exists():  # the last pushed adapter, so a restarted selector scores like before
        with torch.no_grad():
            for name, value in torch.load(saved, weights_only=True).items():
                engine.adapter[name].copy_(value)

    def persist(tensors: dict[str, torch.Tensor], version: int) -> None:
        tmp = saved.with_suffix(".tmp")
        torch.save(tensors, tmp)
        os.replace(tmp, saved)

    for path in unshuffled_manifests(config.data.urls):
        logger.warning("%s: shards written in input order; if that was sorted by source, large batches "
                       "hold one or two sources at a time (run colm-data prepare without --no-shuffle)", path)
    job = Job(
        selector=engine.selector, collator=engine.collator, stream=engine.stream,
        journal=Journal(work, retention=sc.journal_retention), world_size=sc.world_size,
        records_per_step=config.records_per_step, prefetch=sc.prefetch,
        max_inflight=sc.max_inflight, adapter=engine.adapter, on_adapter=persist,
        leader=Leader(engine.adapter) if replicas.world > 1 else None,
    )
    return job, engine.collator, engine.settings


class SelectorServer:
    """A running selector: the job's producer thread plus the gRPC server around it.

    The gRPC server is asyncio's (``grpc.aio``) on an event loop of its own thread: a call waiting
    on a slow client is a suspended coroutine, not a busy worker thread, so health checks and
    Status answer however many such calls are open.

    Health answers SERVING once the producer has selected a step (or has every step the prefetch
    bound allows journaled), and NOT_SERVING before that and for good once the producer fails;
    ``failure`` then holds the reason, Status reports it, and ``on_failure`` is called with it.
    """

    def __init__(self, config: Config, on_failure: Callable[[str], None] | None = None,
                 replicas: Replicas = SINGLE):
        self.config = config
        self.job, collator, model_settings = build_job(config, replicas)
        sc = config.service
        token = sc.auth_token()
        if token:
            warn_if_exposed(sc.auth_token_file)
        tls = sc.tls_pair()  # read here: a missing file stops the selector before it listens
        self.failure: str | None = None
        self._on_failure = on_failure
        self._stopped = threading.Event()
        self._loop = EventLoopThread("colm-grpc")
        # Journal reads, batch messages and adapter checks: short, and never waiting on a client.
        self._pool = ThreadPoolExecutor(max_workers=sc.world_size + sc.max_pushes + 2,
                                        thread_name_prefix="colm-rpc")
        self._changes = Changes(self._loop.loop)
        self.job.add_listener(self._changes.notify_threadsafe)
        self.waiting = Waiting()
        self.servicer = SelectorServicer(
            self.job, job_id=sc.job_id, fingerprint=fingerprint(config), pad_id=collator.pad_token_id,
            max_adapter_bytes=sc.max_adapter_mb << 20, settings=model_settings, pool=self._pool,
            changes=self._changes, first_message_timeout=sc.first_message_timeout,
            chunk_timeout=sc.chunk_timeout, max_pushes=sc.max_pushes, waiting=self.waiting)
        try:
            self.port = self._loop.run(self._build(token, tls))
        except BaseException:
            self._close_loop()
            raise
        self.job.on_failure = self._failed
        self.metrics = SelectorMetrics(self.job, self.waiting) if sc.metrics_port is not None else None
        self.metrics_port: int | None = None
        self._metrics_http = None
        if self.metrics is not None:
            self.job.on_selected = self.metrics.observe

    async def _build(self, token: str | None, tls: tuple[bytes, bytes] | None) -> int:
        """Create the server on the loop (grpc.aio binds it to the running loop); returns its port."""
        sc = self.config.service
        limit = sc.max_message_mb << 20
        self.server = grpc.aio.server(
            interceptors=[TokenInterceptor(token)] if token else None,
            # No BDP probing: a call's receive window stays about one message, so what a client
            # pushes ahead of the servicer's checks is bounded (pushes cross a WAN a message per RTT).
            options=[("grpc.max_send_message_length", limit),
                     ("grpc.max_receive_message_length", limit), ("grpc.http2.bdp_probe", 0)],
        )
        pb_grpc.add_SelectorServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        self._health_lock = asyncio.Lock()  # a failure always wins over a late SERVING
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{sc.host}:{sc.port}"
        if tls is None:
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        if port == 0:
            raise RuntimeError(f"cannot bind {sc.host}:{sc.port}")
        return port

    async def _set_health(self, status: int) -> None:
        """Set both names' status; SERVING only while the selector has neither failed nor stopped."""
        async with self._health_lock:
            serving = status == health_pb2.HealthCheckResponse.SERVING
            if serving and (self.failure is not None or self._stopped.is_set()):
                return
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

    def _tell_health(self, status: int) -> bool:
        """Set the health from a plain thread; False once the loop is gone (the selector stopped)."""
        try:
            self._loop.run(self._set_health(status), timeout=CALL_TIMEOUT)
        except (LoopClosed, TimeoutError):
            return False
        return True

    def _failed(self, reason: str) -> None:
        """The producer cannot go on: NOT_SERVING for good, say why, tell whoever waits on it."""
        self.failure = reason  # before the health call: a SERVING still queued sees it and yields
        self._tell_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        logger.error("selector for job %r cannot go on: %s; health is NOT_SERVING",
                     self.config.service.job_id, reason)
        if self._on_failure is not None:
            self._on_failure(reason)

    def _serve_when_ready(self) -> None:
        if not self.job.wait_ready() or self.failure is not None or self._stopped.is_set():
            return
        if self._tell_health(health_pb2.HealthCheckResponse.SERVING) and self.failure is None \
                and not self._stopped.is_set():
            logger.info("selector for job %r serving", self.config.service.job_id)

    def start(self, wait: bool = True) -> int:
        """Start the producer and the gRPC server; health turns SERVING once the producer is ready.

        ``wait``: return only once it is, or has failed (in-process users then see the final health).
        """
        if self.metrics is not None:
            sc = self.config.service
            self._metrics_http, _ = start_http_server(sc.metrics_port, addr=sc.host,
                                                      registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
            logger.info("metrics on http://%s:%d/metrics", sc.host, self.metrics_port)
        self._loop.run(self.server.start())  # health answers NOT_SERVING until the producer is ready
        sc = self.config.service
        logger.info("selector for job %r listening on %s:%d (%s, %s)", sc.job_id, sc.host, self.port,
                    "TLS" if sc.tls_cert else "plaintext",
                    "token required" if sc.auth_token_file else "no token")
        self.job.start()
        ready = threading.Thread(target=self._serve_when_ready, name="colm-ready", daemon=True)
        ready.start()
        if wait:
            ready.join()
        return self.port

    async def _shut_health(self) -> None:
        async with self._health_lock:
            await self.health.enter_graceful_shutdown()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, finish the step being journaled, end streams with UNAVAILABLE."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._loop.run(self._shut_health(), timeout=CALL_TIMEOUT)
        self.job.stop(timeout=grace * 10)  # waiting streams see JobStopped: UNAVAILABLE
        self._loop.run(self.server.stop(grace), timeout=grace + CALL_TIMEOUT)
        self._close_loop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def _close_loop(self) -> None:
        self.job.remove_listener(self._changes.notify_threadsafe)
        self._loop.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT; exit with status 1 once the producer cannot go on.

    Under torchrun, rank 0 is the service and the other ranks are replicas that score in lockstep
    with it (`service.replicas`); they end when rank 0 does.
    """
    replicas = Replicas.from_env()
    if not replicas.leader:
        engine = build_engine(config, replicas)
        logger.info("selector replica %d of %d following rank 0", replicas.rank, replicas.world)
        follow(selector=engine.selector, collator=engine.collator, stream=engine.stream,
               adapter=engine.adapter, records_per_step=config.records_per_step)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before loading: a stop request is never lost
        signal.signal(sig, lambda *_: stop.set())
    server = SelectorServer(config, on_failure=lambda _reason: stop.set(), replicas=replicas)
    if not stop.is_set():
        server.start(wait=False)
        stop.wait()
    server.stop()
    if server.failure is not None:  # a restart policy (restart: on-failure) or an orchestrator takes over
        logger.error("selector exiting with status 1: %s", server.failure)
        raise SystemExit(1)
