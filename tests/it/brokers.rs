//! Broker faults on a three-node Apache Kafka cluster.
