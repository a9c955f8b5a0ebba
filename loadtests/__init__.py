"""Load tests: Locust scenarios (locustfile.py) and a headless runner with a report (run.py)."""
