"""The job queue as producers see it: the Celery app's configuration, publishing a job, declaring
the queues. The API process uses only this module; the tasks live in :mod:`service.worker`.

Queues ``counterfactual`` and ``train``, one task each (:data:`TASKS`). Messages are
acknowledged after the task (a worker that dies mid-job leaves its message to be delivered
again; a killed pool process makes the worker requeue it at once) and one message is reserved
at a time. A message carries only the job id (also the task id); the job record in the database
says what to do.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from .config import Settings
from .db import JobView, Store

__all__ = ["QUEUES", "TASKS", "make_celery", "publish", "declare_queues"]

QUEUES = ("counterfactual", "train")
TASKS = {"counterfactual": "cdae.counterfactual", "train": "cdae.train"}


def make_celery(settings: Settings) -> Celery:
    transport: dict[str, Any] = {"visibility_timeout": 3600}
    backend: dict[str, Any] = {}
    if settings.broker_prefix:
        transport["global_keyprefix"] = settings.broker_prefix
        backend["global_keyprefix"] = settings.broker_prefix
    celery = Celery("cdae_med_service", broker=settings.broker_url, backend=settings.broker_url)
    celery.conf.update(
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue="counterfactual",
        task_routes={TASKS[q]: {"queue": q, "exchange": q, "routing_key": q} for q in QUEUES},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,  # one process per worker, one worker per GPU
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=7 * 24 * 3600,
        broker_transport_options=transport,
        result_backend_transport_options=backend,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return celery


def publish(celery: Celery, store: Store, job: JobView) -> None:
    """Send the job's message (the task id is the job id); record that it was sent."""
    # ignore_result: the database is the record, and a producer that waited on the result store's
    # connection would hold a submission for as long as that connection retries while Redis is down.
    celery.send_task(TASKS[job.kind], args=[job.id], task_id=job.id, queue=job.kind, routing_key=job.kind,
                     ignore_result=True, retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2,
                                                                   "interval_step": 0.5, "interval_max": 1.0})
    store.mark_published(job.id)


def declare_queues(celery: Celery) -> None:
    """(Re)declare the queues and their bindings. A Redis that restarted empty has lost the
    bindings too, and a producer that declared them once before would publish into nothing."""
    with celery.connection_for_write() as conn:
        channel = conn.default_channel
        for q in celery.conf.task_queues:
            q.bind(channel).declare()
