"""`make bench`: the supervisor measured against a plain paho echo client in the same run (see __main__)."""
