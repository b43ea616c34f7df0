//! Survey data: the model every consumer reads, and pure parsers (text in, [`Survey`] out)
//! for each supported layout. Reading files is the job of [`crate::io::dataset`].

pub mod error;
pub mod report;
pub mod survey;

pub use error::{DataError, DataResult};
pub use report::LoadReport;
pub use survey::{check_distribution, AnswerOption, Group, MetricKind, Question, Survey};

pub(crate) mod csvtext;
pub mod global;
pub mod info;
pub(crate) mod jsontext;
pub mod native;
pub mod opinionqa;
pub mod pylit;
pub mod weighted;
