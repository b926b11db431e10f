//! Configuration seashard writes for other programs: Envoy bootstraps that take
//! their map from the control plane ([`bootstrap`]: edge, sidecar, guard), and the
//! manifests that put seashard into an Istio mesh on Kubernetes ([`istio`]),
//! written as YAML by [`yaml`].
//!
//! This crate only writes files. It reads the control plane's configuration
//! (`seashard.toml`) and names (the ECDS resource of a guard, the filter's
//! placeholder configuration), never the running control plane.

pub mod bootstrap;
pub mod istio;
pub mod yaml;
