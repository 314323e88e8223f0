//! Runs an attempt as a container through the Docker Engine API.

pub struct DockerExecutor;
