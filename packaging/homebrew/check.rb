# Loads pexi.rb with a stand-in for Homebrew's formula DSL, on a machine without Homebrew (Linux CI):
# prints what the formula declares and what its `install` would run as JSON, and runs its `test do` block
# with `bin` the folder of the `pexi` under test and `pkgshare` the repository (which holds what
# `pkgshare.install` copies). Exits non-zero when the block fails. Used by host/tests/packaging.rs:
#
#   ruby check.rb FORMULA REPOSITORY BIN_DIR
require "json"
require "pathname"

formula_file, $repository, $bin_dir = ARGV
abort "usage: ruby check.rb FORMULA REPOSITORY BIN_DIR" unless $bin_dir

class Formula
  @@declared = { "depends_on" => [] }

  def self.declared = @@declared
  def self.desc(text) = @@declared["desc"] = text
  def self.homepage(url) = @@declared["homepage"] = url
  def self.license(name) = @@declared["license"] = name
  def self.head(url, **options) = @@declared["head"] = { "url" => url, "options" => options.transform_keys(&:to_s) }
  def self.depends_on(spec) = @@declared["depends_on"] << spec.to_s
  def self.test(&block) = @@declared_test = block
  def self.test_block = @@declared_test

  attr_reader :ran, :installed

  def initialize
    @ran = []
    @installed = []
  end

  def bin = Pathname.new($bin_dir)
  def pkgshare = Pathname.new($repository)
  def prefix = Pathname.new("/opt/homebrew/Cellar/pexi/HEAD")

  # Homebrew's std_cargo_args: a locked install of the crate at `path` into the keg.
  def std_cargo_args(path: ".")
    ["--locked", "--root", prefix.to_s, "--path", path]
  end

  def system(*args)
    @ran << args.map(&:to_s)
    return true if @recording
    Kernel.system(*args.map(&:to_s), out: :err) or raise "failed: #{args.join(" ")}"
  end

  def shell_output(command, expected = 0)
    output = `#{command}`
    status = $?.exitstatus
    raise "#{command}: exit status #{status}, expected #{expected}\n#{output}" unless status == expected
    output
  end

  def assert_match(pattern, text)
    matched = pattern.is_a?(Regexp) ? pattern.match?(text) : text.include?(pattern)
    raise "#{pattern.inspect} does not match #{text.inspect}" unless matched
  end

  def record_install
    @recording = true
    installer = Object.new
    sink = @installed
    installer.define_singleton_method(:install) { |*items| sink.concat(items.map(&:to_s)) }
    define_singleton_method(:pkgshare) { installer }
    install
    @recording = false
    singleton_class.send(:remove_method, :pkgshare)
  end
end

load formula_file
formula = Pexi.new
formula.record_install
install = { "system" => formula.ran.dup, "pkgshare" => formula.installed }
formula.ran.clear
formula.instance_eval(&Formula.test_block)
puts JSON.generate("declared" => Formula.declared, "install" => install, "test_ran" => formula.ran)
