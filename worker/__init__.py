"""The RQ side of the relay: delivery jobs, mapping rules and the Copernica client."""
