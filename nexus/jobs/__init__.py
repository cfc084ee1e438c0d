"""Job lifecycle: submit, claim, complete, retry, cancel, reconcile."""
