"""The counterfactual service: an HTTP API (:mod:`service.api`, routes in :mod:`service.routes`),
a job queue (:mod:`service.queue`), Celery workers (:mod:`service.worker`), job records and API
keys in SQL (:mod:`service.db`), settings from the environment (:mod:`service.config`)."""
