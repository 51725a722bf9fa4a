"""The PostgreSQL backend: one database shared by any number of phasewatch replicas."""
