//! xlb's user space: loading the datapath, its maps, and (with the agent)
//! keeping them equal to what the cluster's Services say.

mod bpffs;
pub mod clock;
pub mod datapath;
mod error;
pub mod maps;
pub mod object;

pub use datapath::Datapath;
pub use error::Error;
pub use maps::Maps;
