pub mod faultproxy;
pub mod faults;
pub mod fixtures;
pub mod logs;
pub mod s3server;
pub mod torture;
