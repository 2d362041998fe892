//! Test harness for ordo: provisions and starts the stand-ins, spawns the daemons.
