"""mqtt-home-supervisor: one MQTT connection, many isolated worker processes.

The map. Each module imports only modules listed below it (a test checks it); `contracts` is shared with the
workers and imports nothing of this package. The modules named `worker_*` run inside a worker's own process;
`testing` runs them in a test's.

    cli             the command line: parse arguments, load config, run, exit codes
    ctl             the command line's `ctl`: ask the running supervisor through its control API
    testing         a harness for testing a worker's hooks in one process
    core            the Supervisor: the wiring of the parts below and the order of a wake-up
    reloader        a config reload carried out (SIGHUP, ctl reload, watch mode): all or nothing
    pool            the worker pool: every worker's slot and the life of its processes
    liveness        killing a worker process that looks hung or passes its memory limit
    ha_entities     Home Assistant: the supervisor's own entities, and the bundle of all declared ones
    systemd         sd_notify: ready, watchdog, stopping
    metrics         Prometheus /metrics, /healthz and the status page, served on one port
    statuspage      the status page and /healthz, from the status document
    routing         each message from the broker to the workers (and the control API) it is for
    status          the retained status document and each worker's availability
    slot            one worker across its restarts: its state machine, queue, messages in hand
    reloading       a config reload planned: what changed, what applies live, what waits for a restart
    supervision     restart policy: backoff, intensity, when a worker has failed
    control         the control API: <base>/request/<action> and restart presses
    dedupe          publication ids a worker handled, to drop the copies
    publishing      what workers publish, to local subscribers and the broker, durably for QoS >= 1
    router          which workers a topic goes to (MQTT wildcard matching, subscription ids)
    mqtt            the MQTT link: connect, reconnect, will and birth, publish, subscribe (paho's public API)
    fastpaho        paho's client made faster: overrides of its private methods (paho is imported here and in mqtt)
    outbox          QoS >= 1 publications on disk (SQLite) until everyone they were for has them
    delivery        which messages are still owed to someone; acknowledgements in arrival order
    processes       worker processes seen from the supervisor: start, pipe, stop, kill, exit status
    worker_process  inside a worker's process: its start (descriptors, secrets, limits, name) and its end
    worker_loop     inside a worker's process: the loop, and how one message is handled
    worker_context  inside a worker's process: the Context a worker is given, its timers and threads
    logrelay        workers' log lines over MQTT (<base>/log/<worker>): relayed, bounded, rate-limited
    signals         signals as events of the loop
    loop            the selector loop and its timers
    config          the TOML file, environment overrides and secrets
    registry        finding worker classes in the worker packages (worker discovery)
    secrets         secret values: kept out of logs and out of the environment workers inherit
    channel         length-framed msgspec envelopes over a socket pair
    errors          the exception types
"""

__version__ = "0.1.0"
# Marks this package apart from PyPI's `supervisor` (supervisord), which uses the same import name.
__distribution__ = "mqtt-home-supervisor"
