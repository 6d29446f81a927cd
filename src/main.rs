fn main() { sdstream::device::init(); println!("sdstream: being built"); }
