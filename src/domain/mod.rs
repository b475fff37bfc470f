//! The shop's state and its rules, as pure code with no I/O: entities ([`model`]), the
//! commands that Raft replicates ([`command`]), and how a command changes state
//! ([`apply`]). The sled state machine and the in-memory test state both run this code,
//! so the rules exist once.

pub mod apply;
pub mod command;
pub mod event;
pub mod lookup;
pub mod model;
pub mod validate;

#[cfg(test)]
mod tests;

pub use apply::{apply, MemState, State};
pub use command::{Command, Outcome, Rejection, Request};
pub use event::{Change, Event};
pub use lookup::{Found, Lookup};
pub use model::{DcSettings, Inventory, Order, OrderStatus, Session, StockRow};
