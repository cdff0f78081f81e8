"""On-policy preference rounds: sample from the current policy, judge, pair, train, evaluate, again."""
