//! Integration tests: the real worker against a real Kafka-protocol broker
//! (tansu, its own process) and an HTTP server speaking the Uincall API.
//! Each test has its own broker, topics, group and API port.

mod crash;
mod delivery;
mod faults;
mod helpers;
mod replay;
mod retries;
mod secrets;
mod side_port;
