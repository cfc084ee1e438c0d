"""A worker process: the Celery app, the one task, optional model serving, and how the agent starts one.

    task.py       the `run_job` task: decode a JobMessage, run the attempt, mark the activity board
    app.py        the worker's Celery app and its command line (one place for Celery's worker flags)
    main.py       `nexus worker`: queues, optional model serving, then Celery's worker loop
    processes.py  the child processes an agent supervises: tier workers and model-instance workers
"""
