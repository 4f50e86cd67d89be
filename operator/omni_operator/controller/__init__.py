"""The controller: watches into a cache, a work queue, the reconciler, status, leader election."""
