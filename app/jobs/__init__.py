"""The job protocol: every Redis key, Lua script and state transition of a job's life, and the
worker registry, shared by the API and the workers. No other module touches these keys.

A request is one RQ job on its model's queue of its lane (lanes.py: `star-<model>@high`,
`star-<model>` for normal, `star-<model>@low`), so `rq info`, RQ's registries and result TTLs tell
the truth. Its life, in the order of the data path:

    submit   admission.py  API    rate limit, per-key job slot, Idempotency-Key
    queue    submit.py     API    admit under the queue limit (all lanes of the model) and enqueue
                                  on its lane, with a wake token for idle workers (state: queued)
    claim    claim.py      worker pull (lanes.py: highest lane first, through RQ's intermediate
                                  list), then start under WATCH with a fresh owner token (running)
    run      progress.py   worker progress k of S and cancel flags at each scale boundary
    publish  (worker)      the worker stores the PNGs (app.storage) before it finishes the job
    finish   finish.py     worker claim the outcome with the token, record it (succeeded, failed,
                                  canceled; expired for a pulled job past its deadline); a success
                                  adds the job's usage to its key's totals (usage.py), once
    read     read.py       API    the job as clients see it; cancel.py: DELETE /jobs/{id}
    notify   notify.py     both   every ending publishes the job's id (long-polls wake at once)
    webhook  webhooks.py   both   a start or ending the job's webhook asked for leaves an event in
                                  the outbox, in the same transaction; the API delivers it

States (states.py, the one list): queued, running, succeeded, failed, canceled, expired.

    queued  -> running     a worker's start (claim.start), exclusive with a cancel (WATCH)
    queued  -> canceled    the API (cancel.request_cancel: RQ's cancel)
    queued  -> expired     read as such by the API once past its deadline; recorded by the worker
                           that pulls it (finish.expired) or, while it still waits, by the reaper
                           (finish.expire_queued), each under a WATCH of the job: once
    running -> succeeded | failed | canceled    the owning worker only (finish; the token claim)
    running -> queued      release.py: the reaper (its worker is lost) or the worker itself
                           (drain past its grace, device error, shutdown); counted requeues end
                           as failed `worker_lost` past STAR_MAX_REQUEUES, a requested cancel
                           as canceled
What fences a second runner: the owner token in the job's record (keys.OWNER_FIELD). Progress
and the outcome claim are conditional on it (Lua); a release removes it first. A worker presumed
dead that comes back finds its token gone: it drops its results and records nothing.

Worker registry (workers.py): `star:worker:<name>` entries with a heartbeat TTL; the reaper
(reaper.py) re-queues the running jobs of workers whose entry expired.

Modules: keys.py (every key, TTL, Lua script), states.py, lanes.py (lane queues, their dequeue), usage.py (per-key usage), rq_adapter.py (what we rely on in RQ
beyond its documented calls), and the steps above. Import the modules, not this package.
"""
