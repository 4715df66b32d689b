"""Speed and memory measurement: engines run in fresh processes, interleaved, against a roofline bound."""
