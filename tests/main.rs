//! Integration tests: the `stackwarden` binary against the project's AWS emulator
//! (tests/emulator) in front of moto, one of each per test on free loopback ports; and the
//! emulator's own conformance. Modules of one test binary, so the AWS SDK is linked once.

mod amg;
mod aws_behaviour;
mod bad_input;
mod corpus;
mod daemon;
mod deploy;
mod emulator;
mod examples;
mod faults;
mod fleet;
mod grafana;
mod harness;
mod hosts;
mod prometheus;
mod reconcile;
