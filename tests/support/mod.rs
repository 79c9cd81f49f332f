//! Shared test support: a moto server process (Secrets Manager emulator), log capture with a
//! secret scan, and builders for gateway events and proxies. Each test binary includes it with
//! `mod support;` and uses what it needs.
#![allow(dead_code)]

pub mod events;
pub mod logs;
pub mod moto;
