"""Exit codes of every istd command (the README has the same table).

| code | meaning |
|---|---|
| 0 | success; for `istd joiner`: caught up to the donor's last seqno at request time |
| 1 | unexpected internal error (a bug: please report it with the log) |
| 2 | usage error: a bad flag, option, provider option or environment variable |
| 3 | no donor / node reachable at any address given |
| 4 | refused: the donor or node said no, with the reason (e.g. IST impossible, not the writer) |
| 5 | protocol error: the peer sent something that is not valid IST |
| 6 | local state unusable: grastate.dat, gcache or state database corrupt, or data directory in use |
| 130 | interrupted by Ctrl-C (SIGINT); files are consistent |
| 143 | stopped by SIGTERM before finishing; files are consistent |
"""

OK = 0
INTERNAL = 1
USAGE = 2
UNREACHABLE = 3
REFUSED = 4
PROTOCOL = 5
LOCAL_STATE = 6
INTERRUPTED = 130
TERMINATED = 143
