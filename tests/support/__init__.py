"""What the tests share besides fixtures: the shipped data and the model v1 they train (`data`), the processes they
start and wait for (`processes`), the Grafana dashboard's queries (`dashboard`). Fixtures live in conftest.py."""
