"""mqtt-home-supervisor: one MQTT connection, many isolated worker processes.

The map (every module; imports only point down the list; `contracts` is shared with the workers):

    cli          the command line: parse arguments, load config, run, exit codes
    core         the Supervisor: one selector loop wiring everything below together
    control      the control API: requests on <base>/request/<action>, restart presses on <base>/cmd/...
    discovery    the supervisor's own Home Assistant entities
    metrics      the Prometheus endpoint, served from the loop
    statuspage   the status page and the health check next to /metrics
    status       the retained <base>/status document and each worker's availability topic
    systemd      systemd's notify protocol: READY, STOPPING, STATUS and the watchdog
    publishing   what workers publish, to local subscribers and the broker, durably for QoS >= 1
    mqtt         the MQTT link: connect, reconnect, will and birth, publish, subscribe (paho's public API)
    fastpaho     paho's client made faster: our overrides of paho's private methods (paho is imported only
                 here and in mqtt)
    delivery     which messages are still owed to someone; acknowledgements in arrival order
    outbox       QoS >= 1 publications on disk (SQLite) until everyone they were for has them
    dedupe       the publication ids each deduplicating worker has handled lately
    slot         one worker across its restarts: state, queue, messages in hand
    processes    worker processes: start, pipe, stop, kill, exit status
    supervision  restart policy: backoff, intensity, when a worker has failed
    runtime      the worker side of the pipe: the loop inside each worker process
    router       which workers a topic goes to (MQTT wildcard matching)
    channel      length-framed msgspec envelopes over a pipe
    loop         the selector loop and its timers
    config       the TOML file, environment overrides and secrets
    registry     finding worker classes in the worker packages
    secrets      secrets read once, kept out of every environment, handed only to the workers that name them
    errors       the exception types
"""

__version__ = "0.1.0"
# Marks this package apart from PyPI's `supervisor` (supervisord), which uses the same import name.
__distribution__ = "mqtt-home-supervisor"
