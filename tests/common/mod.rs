#![allow(dead_code)]

pub mod faultproxy;
pub mod fixtures;
pub mod s3server;
pub mod torture;
