"""`evolving-rl serve`: a self-evolving agent behind HTTP, for callers who own the environment.

    POST /v1/episodes                 {task, env?, task_type?}  -> episode id, the arm and the skill used
    POST /v1/episodes/{id}/act        {observation, admissible?} -> the solver's next action
    POST /v1/episodes/{id}/end        {success?, score?, final_observation?} -> queued for extraction
    GET  /v1/queue/{qid}              extraction state of an ended episode
    GET  /v1/skills[?status=]         the library with each skill's uses, control and lift
    GET  /v1/skills/{id}[/history]    one skill (card, provenance, lifecycle) / its audit-log rows
    POST /v1/skills                   admin: submit a skill (audited, quarantined)
    POST /v1/skills/{id}/retire|restore   admin
    GET  /v1/versions[/{v}]           library versions / one version's content
    POST /v1/versions/{v}/rollback    admin: restore version v exactly (as a new version)
    GET  /v1/audit                    the append-only audit log
    GET  /v1/export                   the current library as JSON (feed it to `evolving-rl evolve --import`)
    GET  /metrics  (Prometheus text)  GET /healthz

Actions are decided in batches: concurrent episodes' requests wait up to `serve.batch_wait_ms`
to share one policy call (one decode of 32 prompts costs little more than one). Ended
episodes are written to the library's database in the same transaction that counts their
outcome, and a background thread turns them into skills; a row leaves the queue only once its
skill is stored, so a kill -9 at any point loses nothing. Every input is bounded (body bytes,
text lengths, list sizes, live episodes, requests per second per client) and answered with a
4xx naming the field and the limit; library changes need the admin token.
"""


import asyncio
import hmac
import logging
import os
import queue
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from evolving_rl import prompts
from evolving_rl.builders import extractor_name
from evolving_rl.serve.evolver import Decision, SkillEvolver, SkillRejected, extract_into
from evolving_rl.types import Episode, Task, Turn

log = logging.getLogger("evolving_rl.serve")

try:
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi import Path as PathParam
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"`evolving-rl serve` needs the serve extra: pip install 'evolving-rl[serve]' ({e})") from None

_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


def _ID():  # noqa: N802 - reads as a type in signatures
    """A path id. SQLite integers are 64-bit: a larger id is a 422, not an overflow. A new
    object each time: FastAPI binds a parameter object to the first name it is used for."""
    return PathParam(ge=1, le=2**62)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


# -- request bodies: every field bounded, unknown fields refused ------------------------------


def _models(sc):
    class _Body(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class StartEpisode(_Body):
        task: str = Field(min_length=1, max_length=sc.max_task_chars, description="The task description.")
        env: str | None = Field(None, pattern=_NAME, description="Environment kind for the solver's role line.")
        task_type: str | None = Field(None, pattern=_NAME)

    class Act(_Body):
        observation: str = Field(max_length=sc.max_observation_chars)
        admissible: list[str] | None = Field(None, max_length=sc.max_admissible)

    class End(_Body):
        success: bool | None = None
        score: float | None = Field(None, ge=0.0, le=1.0)
        final_observation: str = Field("", max_length=sc.max_observation_chars)

    class Reason(_Body):
        reason: str = Field(min_length=1, max_length=500)

    class SubmitSkill(_Body):
        skill: dict = Field(description="A skill in the extractor's JSON schema.")
        task: str = Field(min_length=1, max_length=sc.max_task_chars, description="A task it is for (retrieval key).")
        reason: str = Field(min_length=1, max_length=500)

    return StartEpisode, Act, End, Reason, SubmitSkill


@dataclass
class _Session:
    id: str
    task: str
    env: str
    task_type: str
    embedding: list[float]
    decision: Decision
    turns: list[Turn] = field(default_factory=list)
    last_seen: float = field(default_factory=time.monotonic)
    busy: bool = False


class _Metrics:
    """Counters and one latency histogram in Prometheus text format (no client library needed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self.hist = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.hist_sum = 0.0

    def inc(self, name: str, by: float = 1.0, **labels: str) -> None:
        with self.lock:
            self.counters[(name, tuple(sorted(labels.items())))] += by

    def observe_action(self, seconds: float) -> None:
        with self.lock:
            i = next((k for k, b in enumerate(_LATENCY_BUCKETS) if seconds <= b), len(_LATENCY_BUCKETS))
            self.hist[i] += 1
            self.hist_sum += seconds

    def render(self, gauges: dict[tuple[str, tuple], float]) -> str:
        lines = []
        with self.lock:
            items = list(self.counters.items()) + list(gauges.items())
            hist, hsum = list(self.hist), self.hist_sum
        for (name, labels), v in sorted(items):
            lab = ",".join(f'{k}="{val}"' for k, val in labels)
            lines.append(f"{name}{{{lab}}} {v:g}" if lab else f"{name} {v:g}")
        acc = 0
        for b, n in zip(_LATENCY_BUCKETS, hist):
            acc += n
            lines.append(f'evolving_rl_action_seconds_bucket{{le="{b}"}} {acc}')
        acc += hist[-1]
        lines += [f'evolving_rl_action_seconds_bucket{{le="+Inf"}} {acc}', f"evolving_rl_action_seconds_sum {hsum:.6f}",
                  f"evolving_rl_action_seconds_count {acc}"]
        return "\n".join(lines) + "\n"


class RateLimiter:
    """A token bucket per client address: `burst` requests at once, `rate` per second after."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.get(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if len(self.buckets) >= self.max_clients and client not in self.buckets:
            self.buckets.clear()  # bounded memory under many addresses; each starts full again
        ok = tokens >= 1
        self.buckets[client] = (tokens - 1 if ok else tokens, now)
        return ok


class _Batcher:
    """One thread owns the policy for actions: requests queue up and share one generate call."""

    def __init__(self, service: "Service") -> None:
        self.s = service
        self.q: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="action-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt_ids: list[int], allowed) -> Future:
        fut: Future = Future()
        self.q.put((prompt_ids, allowed, fut))
        return fut

    def _loop(self) -> None:
        sc, sampling = self.s.cfg.serve, self.s.cfg.rollout.solver
        while True:
            batch = [self.q.get()]
            deadline = time.monotonic() + sc.batch_wait_ms / 1000
            while len(batch) < sc.batch_size:
                try:
                    batch.append(self.q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            allowed = [a for _, a, _ in batch]
            try:
                with self.s.policy_lock:
                    gens = self.s.policy.generate(
                        [p for p, _, _ in batch], temperature=0.0 if sc.greedy else sampling.temperature,
                        top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens, stop=[prompts.ACTION_STOP],
                        allowed=allowed if any(a is not None for a in allowed) else None)
                for (_, _, fut), g in zip(batch, gens):
                    fut.set_result(g)
            except Exception as e:  # the policy failed: every waiting request learns it
                log.exception("policy call failed")
                for _, _, fut in batch:
                    fut.set_exception(e)


class Service:
    """The policy, the embedder, the evolver, live episodes, the batcher and the extraction worker.

    `policy` is the solver; `extractor` writes the skills, the solver itself unless
    `extractor_model` names another model (e.g. a served one beside local solver weights)."""

    def __init__(self, cfg, policy=None, embedder=None, extractor=None) -> None:
        from evolving_rl.skills.pg_library import open_library

        if cfg.rollout.prompt_format != "per_step":
            raise ValueError("serve: rollout.prompt_format must be per_step (a caller-driven episode sends one "
                             "observation per request; the growing multi_turn sequence is not kept)")
        self.cfg = cfg
        from evolving_rl.builders import build_extractor, build_policy

        if policy is None:
            policy = build_policy(cfg)
        if extractor is None:
            extractor = build_extractor(cfg, policy)
        if embedder is None:
            from evolving_rl.retrieval import make_embedder

            embedder = make_embedder(cfg.retrieval.embedder)
        self.policy, self.embedder = policy, embedder
        self.policy_lock = threading.Lock()
        self.extractor = extractor
        # one local model in both roles: extraction waits for the batcher's call (its weights and
        # cache are not thread-safe); a separate extractor, or a served one, runs beside the actions
        shared = extractor is policy and not getattr(policy, "thread_safe", False)
        self.extractor_lock = self.policy_lock if shared else threading.Lock()
        self.embed_lock = threading.Lock()
        self._action_ids = prompts.action_encoder(policy)
        self.evolver = self._evolver(open_library(cfg.serve.library, dedup_threshold=cfg.library.dedup_threshold))
        self.sessions: dict[str, _Session] = {}
        self.metrics = _Metrics()
        self.limiter = RateLimiter(cfg.serve.rate_per_s, cfg.serve.rate_burst)
        self.extracting: int | None = None
        self.extractor_error: str | None = None  # while a served extractor is unreachable: why
        self.started = time.time()
        self.batcher = _Batcher(self)
        self._stop = threading.Event()
        self.worker = threading.Thread(target=self._extract_loop, name="extractor", daemon=True)
        if cfg.serve.extract:
            self.worker.start()

    def _evolver(self, library) -> SkillEvolver:
        ev = self.cfg.evolving
        return SkillEvolver(library, self.cfg.evolve, min_chars=ev.min_skill_chars, max_chars=ev.max_skill_chars)

    # -- helpers ---------------------------------------------------------------------------

    def embed(self, text: str) -> list[float]:
        with self.embed_lock:
            return [float(x) for x in self.embedder.embed([text])[0]]

    def expire(self) -> None:
        cutoff = time.monotonic() - self.cfg.serve.session_ttl_s
        for sid in [k for k, s in self.sessions.items() if s.last_seen < cutoff and not s.busy]:
            del self.sessions[sid]
            self.metrics.inc("evolving_rl_episodes_expired_total")

    def prompt(self, s: _Session, observation: str, admissible: list[str] | None) -> tuple[list[int], Any]:
        r = self.cfg.rollout
        msgs = prompts.per_step_messages(
            s.task, s.turns, observation, admissible, skill_card=s.decision.card, env=s.env, history=r.history,
            use_state_line=r.state_line, reasoning=r.reasoning, step=len(s.turns) + 1,
            max_steps=self.cfg.env.max_steps, list_admissible=r.list_admissible or not admissible)
        ids = self.policy.encode_chat(msgs)[-r.max_prompt_tokens:]
        allowed = [self._action_ids(a) for a in admissible] if r.constrain_to_admissible and admissible else None
        return ids, allowed

    # -- extraction worker -----------------------------------------------------------------

    def _extract_loop(self) -> None:
        from evolving_rl.skills.pg_library import open_library

        # SQLite connections belong to one thread: the worker has its own on the same library
        # (on PostgreSQL its own session, which holds the episode it extracts: evolver.claim).
        ev = self._evolver(open_library(self.cfg.serve.library, dedup_threshold=self.cfg.library.dedup_threshold))
        sampling = self.cfg.rollout.extractor
        if self.cfg.serve.greedy:
            sampling = sampling.model_copy(update={"temperature": 0.0})
        held, outages = None, 0  # an episode waiting for the extractor's server to come back
        while not self._stop.is_set():
            try:
                todo = held or ev.claim()
            except Exception:
                log.exception("reading the episode queue failed")
                self._stop.wait(1.0)
                continue
            if not todo:
                self._stop.wait(0.2)
                continue
            (qid, p), held = todo, None
            self.extracting = qid
            try:
                near = ev.library.retrieve(p["embedding"], 1)
                if near and near[0].similarity is not None and near[0].similarity >= ev.library.dedup_threshold:
                    # the skill would not be stored (evolver.admit keeps the one under measurement):
                    # spare the extractor's minutes, most of a busy service's policy time
                    ev.finish_queued(qid, {"skill_id": near[0].id, "rejected": [], "duplicate": True})
                    self.metrics.inc("evolving_rl_extractions_total", result="duplicate_skipped")
                    continue
                ep = _episode(p)
                with self.extractor_lock:
                    res = extract_into(ev, self.extractor, [ep], [p["embedding"]], [{
                        "source_task_id": ep.task.id, "model": extractor_name(self.cfg), "success": ep.won,
                        "trajectory_ref": f"episode_queue:{qid}"}], sampling,
                        max_trajectory_chars=self.cfg.evolving.max_trajectory_chars, seed=qid)[0]
                ev.finish_queued(qid, res)
                outages, self.extractor_error = 0, None
                self.metrics.inc("evolving_rl_extractions_total", result="admitted" if res["skill_id"] else "rejected")
            except Exception as e:
                if getattr(e, "transient", False):
                    # a served extractor that is down or overloaded: the episode is nobody's fault, so
                    # it stays queued (held by this worker, in order) and is retried after a pause
                    # that grows while the outage lasts, never marked failed
                    held, outages, self.extractor_error = todo, outages + 1, str(e)[:500]
                    log.warning("extractor unavailable, queued episode %s kept: %s", qid, e)
                    self.metrics.inc("evolving_rl_extractions_total", result="extractor_unavailable")
                    self._stop.wait(min(60.0, 2.0 ** outages))
                    continue
                # a payload that can never be extracted must not block the queue
                log.exception("extraction of queued episode %s failed", qid)
                ev.finish_queued(qid, {"skill_id": None, "error": f"{type(e).__name__}: {e}"[:500]}, failed=True)
                self.metrics.inc("evolving_rl_extractions_total", result="error")
            finally:
                self.extracting = None

    def close(self) -> None:
        self._stop.set()


def _episode(p: dict) -> Episode:
    task = Task(id=f"serve/{p['episode_id']}", split="serve", task_type=p.get("task_type") or "unknown",
                description=p["task"], locator="", env=p["env"])
    turns = [Turn(t["observation"], None, t["completion"], t["action"], t["valid"]) for t in p["turns"]]
    return Episode(task=task, turns=turns, won=bool(p["won"]), score=float(p["score"]), steps=len(turns),
                   final_observation=p.get("final_observation", ""))


# -- the app ------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    cfg, sc = service.cfg, service.cfg.serve
    StartEpisode, Act, End, Reason, SubmitSkill = _models(sc)
    app = FastAPI(title="evolving-rl serve", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    admin_token = os.environ.get(sc.admin_token_env, "")
    if len(admin_token) < 16:  # a guessable token is no guard (the MCP server asks the same)
        admin_token = ""

    def fail(status: int, msg: str):
        raise HTTPException(status_code=status, detail=msg)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return JSONResponse({"detail": "the request body is not valid JSON"}, status_code=400)
        msgs = []
        for e in errs[:10]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            msgs.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):  # a bug, never the caller's input: no traceback out
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": "internal error (logged on the server)"}, status_code=500)

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        t0 = time.perf_counter()
        client = request.client.host if request.client else "?"
        if not service.limiter.allow(client):
            resp = JSONResponse({"detail": f"rate limit: more than serve.rate_per_s={sc.rate_per_s:g} requests/s "
                                           f"from {client}; slow down"}, status_code=429)
        else:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > sc.max_body_bytes):
                resp = JSONResponse({"detail": f"request body larger than serve.max_body_bytes={sc.max_body_bytes}"},
                                    status_code=413)
            elif length is None and request.method in ("POST", "PUT", "PATCH") and \
                    len(await _read_bounded(request, sc.max_body_bytes)) > sc.max_body_bytes:
                resp = JSONResponse({"detail": f"request body larger than serve.max_body_bytes={sc.max_body_bytes}"},
                                    status_code=413)
            else:
                resp = await call_next(request)
        route = request.scope.get("route")
        service.metrics.inc("evolving_rl_requests_total", path=getattr(route, "path", "unmatched"),
                            status=str(resp.status_code))
        service.metrics.inc("evolving_rl_request_seconds_total", time.perf_counter() - t0)
        return resp

    def admin(request: Request) -> str:
        """The actor for the audit log, once the token checks out."""
        if not admin_token:
            fail(403, f"library changes are disabled: start the server with ${sc.admin_token_env} set "
                      "(16+ characters)")
        auth = request.headers.get("authorization", "")
        given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), admin_token.encode()):
            fail(401, "admin token missing or wrong (send Authorization: Bearer <token>)")
        who = request.headers.get("x-actor", "admin")
        if not (0 < len(who) <= 64 and all(c.isalnum() or c in "_.@-" for c in who)):
            fail(422, "X-Actor: 1-64 letters, digits or _.@-")
        return f"{who}@{request.client.host if request.client else '?'}"

    def session(eid: str) -> _Session:
        s = service.sessions.get(eid)
        if s is None:
            fail(404, f"episode {eid[:64]!r} is not live (never started, already ended, or idle past "
                      f"serve.session_ttl_s={sc.session_ttl_s:g})")
        s.last_seen = time.monotonic()
        return s

    # -- episodes ------------------------------------------------------------------------

    @app.post("/v1/episodes")
    async def start(body: StartEpisode):
        service.expire()
        if len(service.sessions) >= sc.max_sessions:
            fail(429, f"serve.max_sessions={sc.max_sessions} episodes are live; end some first")
        emb = await asyncio.to_thread(service.embed, body.task)
        d = service.evolver.choose(emb)
        eid = uuid.uuid4().hex
        service.sessions[eid] = _Session(eid, body.task, body.env or cfg.env.name, body.task_type or "unknown", emb, d)
        service.metrics.inc("evolving_rl_episodes_started_total", arm=d.arm)
        skill = None if d.skill_id is None else {"id": d.skill_id, "name": d.skill_name, "status": d.status,
                                                  "similarity": d.similarity}
        return {"episode_id": eid, "arm": d.arm, "skill": skill, "library_version": service.evolver.current_version()}

    @app.post("/v1/episodes/{eid}/act")
    async def act(eid: str, body: Act):
        s = session(eid)
        if s.busy:
            fail(409, "an action for this episode is still being decided; wait for it")
        if len(s.turns) >= cfg.env.max_steps:
            fail(409, f"the episode has taken env.max_steps={cfg.env.max_steps} steps; end it")
        bad = next((a for a in body.admissible or [] if not a.strip() or len(a) > sc.max_action_chars), None)
        if bad is not None:
            fail(422, f"admissible: every action must be non-empty and at most serve.max_action_chars="
                      f"{sc.max_action_chars} chars")
        adm = body.admissible or None
        s.busy = True
        try:
            t0 = time.perf_counter()
            ids, allowed = service.prompt(s, body.observation, adm)
            g = await asyncio.wrap_future(service.batcher.submit(ids, allowed))
            service.metrics.observe_action(time.perf_counter() - t0)
        finally:
            s.busy = False
        action, _ = prompts.parse_action(g.text)
        valid = adm is None or action in adm
        s.turns.append(Turn(body.observation, adm, g.text, action, valid))
        return {"action": action, "completion": g.text, "step": len(s.turns), "valid": valid}

    @app.post("/v1/episodes/{eid}/end")
    async def end(eid: str, body: End):
        s = session(eid)
        if s.busy:
            fail(409, "an action for this episode is still being decided; end it after that")
        if body.success is None and body.score is None:
            fail(422, "give success (true/false) and/or score (0..1)")
        won = body.success if body.success is not None else body.score >= sc.success_score
        outcome = float(body.success) if body.success is not None else float(body.score)
        payload = {"episode_id": s.id, "task": s.task, "env": s.env, "task_type": s.task_type, "won": won,
                   "score": float(body.score if body.score is not None else float(won)),
                   "final_observation": body.final_observation, "embedding": s.embedding,
                   "turns": [{"observation": t.observation, "completion": t.completion, "action": t.action,
                              "valid": t.valid} for t in s.turns]}
        learn = sc.extract and bool(s.turns)
        changes, qid = service.evolver.record(s.decision, outcome, queue_payload=payload if learn else None)
        del service.sessions[eid]
        service.metrics.inc("evolving_rl_episodes_ended_total", arm=s.decision.arm, won=str(won).lower())
        return {"queued": qid, "arm": s.decision.arm, "skill_id": s.decision.skill_id, "status_changes": changes}

    @app.get("/v1/queue/{qid}")
    async def queued(qid: int = _ID()):
        try:
            return service.evolver.queued(qid)
        except KeyError as e:
            fail(404, str(e.args[0]))

    # -- the library ---------------------------------------------------------------------

    @app.get("/v1/skills")
    async def skills(status: Literal["quarantined", "promoted", "retired"] | None = None,
                     offset: int = Query(0, ge=0, le=2**62), limit: int = Query(100, ge=1, le=1000)):
        return {"skills": service.evolver.skills(status=status, offset=offset, limit=limit),
                "version": service.evolver.current_version()}

    @app.get("/v1/skills/{skill_id}")
    async def skill(skill_id: int = _ID()):
        try:
            return service.evolver.skill(skill_id)
        except KeyError as e:
            fail(404, str(e.args[0]))

    @app.get("/v1/skills/{skill_id}/history")
    async def history(skill_id: int = _ID()):
        try:
            rec = service.evolver.library.get(skill_id)
        except KeyError as e:
            fail(404, str(e.args[0]))
        return {"audit_log": service.evolver.audit_log(skill_id), "merge_history": rec.history}

    @app.post("/v1/skills")
    async def submit(request: Request, body: SubmitSkill):
        from evolving_rl.skills.skill import Skill, render_card

        who = admin(request)
        sk = Skill.model_validate(body.skill)
        if not sk.is_valid():
            fail(422, "skill: needs a non-empty name and description")
        emb = await asyncio.to_thread(service.embed, body.task)
        try:
            sid = service.evolver.admit(sk.to_dict(), render_card(sk), emb, {"source_task_id": None, "model": who},
                                        actor=who, reason=body.reason)
        except SkillRejected as e:
            fail(422, f"skill rejected: {e}")
        return {"skill_id": sid, "status": service.evolver.statuses([sid])[sid],
                "version": service.evolver.current_version()}

    async def _admin_op(request: Request, fn, *args, reason: str):
        who = admin(request)
        try:
            v = fn(*args, actor=who, reason=reason)
        except KeyError as e:
            fail(404, str(e.args[0]))
        except ValueError as e:
            fail(409, str(e))
        return {"version": v}

    @app.post("/v1/skills/{skill_id}/retire")
    async def retire(request: Request, body: Reason, skill_id: int = _ID()):
        return await _admin_op(request, service.evolver.retire, skill_id, reason=body.reason)

    @app.post("/v1/skills/{skill_id}/restore")
    async def restore(request: Request, body: Reason, skill_id: int = _ID()):
        return await _admin_op(request, service.evolver.restore, skill_id, reason=body.reason)

    @app.get("/v1/versions")
    async def versions(limit: int = Query(100, ge=1, le=1000)):
        return {"versions": service.evolver.versions(limit)}

    @app.get("/v1/versions/{version}")
    async def version_content(version: int = _ID()):
        try:
            return {"version": version, **service.evolver.snapshot(version)}
        except KeyError as e:
            fail(404, str(e.args[0]))

    @app.post("/v1/versions/{version}/rollback")
    async def rollback(request: Request, body: Reason, version: int = _ID()):
        return await _admin_op(request, service.evolver.rollback, version, reason=body.reason)

    @app.get("/v1/audit")
    async def audit_log(limit: int = Query(200, ge=1, le=5000), skill_id: int | None = Query(None, ge=1)):
        return {"audit_log": service.evolver.audit_log(skill_id, limit)}

    @app.get("/v1/export")
    async def export():
        return {"format": "evolving-rl-skills/1", **service.evolver.snapshot()}

    # -- operations ----------------------------------------------------------------------

    @app.get("/healthz")
    async def health():
        return {"status": "ok", "model": cfg.model.path, "extractor": extractor_name(cfg),
                "library": str(service.evolver.path),
                "library_version": service.evolver.current_version(), "skills": service.evolver.counts(),
                "queue": service.evolver.queue_counts(), "extracting": service.extracting,
                "extractor_error": service.extractor_error,
                "live_episodes": len(service.sessions), "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/metrics")
    async def metrics():
        ev = service.evolver
        g: dict[tuple[str, tuple], float] = {}
        for st, n in ev.counts().items():
            g[("evolving_rl_skills", (("status", st),))] = n
        for st, n in ev.queue_counts().items():
            g[("evolving_rl_queue_episodes", (("state", st),))] = n
        for arm, d in ev.arm_stats().items():
            g[("evolving_rl_arm_episodes", (("arm", arm),))] = d["episodes"]
            g[("evolving_rl_arm_wins", (("arm", arm),))] = d["wins"]
        g[("evolving_rl_library_version", ())] = ev.current_version()
        g[("evolving_rl_live_episodes", ())] = len(service.sessions)
        return PlainTextResponse(service.metrics.render(g), media_type="text/plain; version=0.0.4")

    @app.exception_handler(404)
    async def _not_found(request: Request, exc):
        detail = getattr(exc, "detail", None)
        return JSONResponse({"detail": detail if detail and detail != "Not Found" else
                             f"no such endpoint: {request.method} {request.url.path[:200]}"}, status_code=404)

    @app.exception_handler(405)
    async def _method(request: Request, exc):
        return JSONResponse({"detail": f"{request.method} is not allowed on {request.url.path[:200]}"}, status_code=405)

    return app


async def _read_bounded(request: Request, limit: int) -> bytes:
    """A body without Content-Length (chunked) read only up to limit + 1 bytes."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            break
    request._body = bytes(buf)  # Starlette reads a cached body later
    return bytes(buf)


def serve(cfg, *, say=print) -> None:
    """Load the model and the library, then serve until interrupted."""
    import uvicorn

    service = Service(cfg)
    app = create_app(service)
    counts = service.evolver.counts()
    say(f"library {service.evolver.path}: " + ", ".join(f"{n} {k}" for k, n in counts.items()) +
        f"; {service.evolver.queue_counts()['pending']} ended episodes waiting for extraction")
    if len(os.environ.get(cfg.serve.admin_token_env, "")) < 16:
        say(f"${cfg.serve.admin_token_env} is not set (16+ characters): library changes over HTTP are refused")
    say(f"serving {cfg.model.path} on http://{cfg.serve.host}:{cfg.serve.port}" +
        (f"; skills extracted by {extractor_name(cfg)} ({cfg.extractor_model.backend})" if cfg.extractor_model else ""))
    try:
        uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning", access_log=False)
    finally:
        service.close()
