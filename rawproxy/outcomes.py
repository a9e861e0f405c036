"""Every outcome the proxy names: why a connect failed, how a connection ended.

These strings are part of the contract: they appear as metric labels
(``rawproxy_target_connect_failures_total{reason=...}``,
``rawproxy_connections_closed_total{end=...}``), in the access log's
``end=`` field and in ``LastFailure`` of the status views.  Nothing else in
the code spells them: import them from here, so a typo is a NameError and
a rename is one edit.

This module imports nothing from the package (everything may import it).
"""

from __future__ import annotations

# -- why a connect attempt to a target failed (metrics ``reason``) -----------

DNS = "dns"                  # the target's name did not resolve
TIMEOUT = "timeout"          # no answer within the budget (ConnectTimeout / health Timeout)
REFUSED = "refused"          # ECONNREFUSED: nothing listening
UNREACHABLE = "unreachable"  # no route, host down, address not available, family off
RESET = "reset"              # reset or aborted (connect reason AND end code)
NO_ADDRESS = "no address"    # the name resolved to nothing that could be tried
# Any other connect errno is reported by its lower-case errno name
# (netio.connect_reason), e.g. "eacces".

CONNECT_REASONS = frozenset({DNS, TIMEOUT, REFUSED, UNREACHABLE, RESET, NO_ADDRESS})

# -- how a client connection ended (``Session.end``, access log ``end=``) ----
# RESET (above) too: a side reset or broke, and the other was aborted.

DONE = "done"                            # both directions finished with FIN
IDLE_TIMEOUT = "idle-timeout"            # the app's IdleTimeout passed with no bytes moving
HALF_OPEN_TIMEOUT = "half-open-timeout"  # one direction ended, the other went quiet
CONNECT_FAILED = "connect-failed"        # every target failed (or none was up)
NO_RESOURCES = "no-resources"            # no descriptor / memory here for this connection
ERROR = "error"                          # an unexpected error (a bug): logged with traceback
CLIENT_GONE = "client-gone"              # the client left while a target was being connected
DENIED = "denied"                        # client address not in AllowFrom
SHED = "shed"                            # accepted at the descriptor limit and dropped at once
SHUTDOWN = "shutdown"                    # the proxy stopped
DRAIN_TIMEOUT = "drain-timeout"          # still open when a drain's time ran out

# Reserved for features being built (documented so that nothing else
# claims the names meanwhile):
CLIENT_LIMIT = "client-limit"      # a per-client connection limit refused the client
QUEUE_TIMEOUT = "queue-timeout"    # waited for a free slot (MaxConnections queue) too long
START_TIMEOUT = "start-timeout"    # an on-demand (autostart) target did not come up in time
START_FAILED = "start-failed"      # an on-demand target's start command failed
NO_TARGET = "no-target"            # the route has no target to try at all

END_CODES = frozenset({
    RESET, DONE, IDLE_TIMEOUT, HALF_OPEN_TIMEOUT, CONNECT_FAILED,
    NO_RESOURCES, ERROR, CLIENT_GONE, DENIED, SHED, SHUTDOWN,
    DRAIN_TIMEOUT, CLIENT_LIMIT, QUEUE_TIMEOUT, START_TIMEOUT, START_FAILED, NO_TARGET,
})
