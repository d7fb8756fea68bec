//! Test support shared by the VM tests: Firecracker's own API description
//! (`shared/firecracker/firecracker-api.yaml`, Swagger 2.0) turned into JSON Schema validators, a
//! fake Firecracker API, and real host tap devices.
#![allow(dead_code)] // each test binary uses a different subset

pub mod fake_api;
pub mod hostile_agent;
pub mod swagger;
pub mod tap;
