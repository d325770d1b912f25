//! Integration tests: the `stackwarden` binary against a real AWS emulator (moto), one moto
//! server per test on a free loopback port. Modules of one test binary, so the AWS SDK is linked
//! once.

mod bad_input;
mod harness;
mod reconcile;
